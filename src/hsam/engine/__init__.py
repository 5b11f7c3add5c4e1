"""Training engine: data assembly for a run, the trainer, distributed helpers."""
