"""Training engine: losses and schedules, data assembly for a run, the trainer, distributed
helpers. Import the modules themselves; this package imports nothing."""
