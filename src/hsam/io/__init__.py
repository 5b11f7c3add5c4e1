"""Files: atomic writes, checksums, SAM backbone weights, hsam checkpoints and medical images
(:mod:`hsam.io.images`). Import the modules themselves; this package imports nothing."""
