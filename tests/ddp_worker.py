"""Run by torchrun in test_training: train, then each rank dumps its trainable tensors."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from hsam.config import load_run_config
from hsam.engine import trainer as trainer_module

captured = {}
_original_fit = trainer_module.Trainer.fit


def _fit_and_capture(self, **kwargs):
    result = _original_fit(self, **kwargs)
    captured.update(
        {n: p.detach().clone() for n, p in self.parts.model.named_parameters() if p.requires_grad}
    )
    return result


trainer_module.Trainer.fit = _fit_and_capture
cfg_path, run_dir = sys.argv[1], Path(sys.argv[2])
trainer_module.run_training(load_run_config(cfg_path), run_dir)
rank = int(__import__("os").environ["RANK"])
torch.save(captured, run_dir / f"rank{rank}.pt")
assert not dist.is_initialized()
