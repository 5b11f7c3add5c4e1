"""Build what one training run is made of, before the loop starts: the resolved config, data,
model (wrapped for DDP / torch.compile), optimiser, step schedule and micro-batch source (the
slice loader or an encoder-prefix cache).

Everything here consumes the global RNGs in a fixed order after :func:`seed_everything`, so
the same config and seed build the same parts (and so train the same weights)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from hsam.build import BuiltModel, build_hsam
from hsam.config import RunConfig, TrainConfig
from hsam.data import SliceDataset
from hsam.devices import check_compile_supported, resolve_precision
from hsam.engine.data import RunData, run_data_of
from hsam.engine.distributed import ProcessInfo
from hsam.engine.losses import learning_rate, schedule_epoch, stage1_weight
from hsam.engine.prefix_cache import PrefixCache
from hsam.errors import ConfigError
from hsam.modeling.cmattn import class_noise_std_from_frequencies
from hsam.modeling.hsam import HSAM

__all__ = [
    "MicroBatches",
    "RunParts",
    "StepSchedule",
    "build_run_parts",
    "resolve_config",
    "seed_everything",
]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_config(cfg: RunConfig, data: RunData, device: torch.device) -> RunConfig:
    """`cfg` with what the run computes from its data and hardware filled in (the class noise
    stds of a two-stage paper-CMAttn model left empty; precision auto); a new object, `cfg`
    stays as the caller made it. The result is what config.yaml and every checkpoint record."""
    mcfg = cfg.model
    if mcfg.stages == 2 and mcfg.cmattn == "paper" and mcfg.class_noise_std is None:
        std = class_noise_std_from_frequencies(
            data.class_frequencies.tolist(), mcfg.cmattn_noise_max_std
        )
        mcfg = dataclasses.replace(mcfg, class_noise_std=std)
    precision = resolve_precision(cfg.train.precision, device)
    return dataclasses.replace(
        cfg, model=mcfg, train=dataclasses.replace(cfg.train, precision=precision)
    )


class MicroBatches:
    """The micro-batches of each epoch on this rank: augmented slices from a loader, or the
    cached encoder-prefix features of those slices."""

    def __init__(
        self,
        *,
        dataset: SliceDataset,
        train: TrainConfig,
        process: ProcessInfo,
        cache: PrefixCache | None,
    ) -> None:
        self.dataset = dataset
        self.train = train
        self.process = process
        self.cache = cache
        self.sampler: DistributedSampler | None = None
        if process.distributed:
            self.sampler = DistributedSampler(
                dataset,
                num_replicas=process.world_size,
                rank=process.rank,
                shuffle=True,
                seed=train.seed,
            )

    def per_epoch(self) -> int:
        """Micro-batches of one epoch on this rank."""
        if self.cache is not None:
            return -(-len(self.cache) // (self.train.batch_size * self.process.world_size))
        return len(self._loader(epoch=0))

    def _loader(self, epoch: int) -> DataLoader:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            sampler = self.sampler
        else:
            # A fresh generator per epoch: the order depends on (seed, epoch) only, so a
            # resumed run sees exactly the batches an uninterrupted one would.
            gen = torch.Generator().manual_seed(self.train.seed * 1000 + epoch)
            sampler = RandomSampler(self.dataset, generator=gen)
        self.dataset.set_epoch(epoch)
        return DataLoader(
            self.dataset,
            batch_size=self.train.batch_size,
            sampler=sampler,
            num_workers=self.train.num_workers,
            drop_last=False,
        )

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, labels, start_unit): slices (unit 0), or cached prefix features."""
        if self.cache is not None:
            for feats, labels in self.cache.batches(
                epoch,
                batch_size=self.train.batch_size,
                seed=self.train.seed,
                rank=self.process.rank,
                world_size=self.process.world_size,
            ):
                yield feats, labels, self.cache.start_unit
        else:
            for batch in self._loader(epoch):
                yield batch["image"], batch["label"], 0


@dataclass(frozen=True, kw_only=True)
class StepSchedule:
    """Optimiser steps of the run, the learning rate and the stage-1 loss weight at a step."""

    steps_per_epoch: int
    total_steps: int
    train: TrainConfig

    @classmethod
    def for_run(cls, train: TrainConfig, micro_batches_per_epoch: int) -> StepSchedule:
        steps = max(1, micro_batches_per_epoch // train.accumulation_steps)
        if train.max_steps_per_epoch is not None:
            steps = min(steps, train.max_steps_per_epoch)
        return cls(steps_per_epoch=steps, total_steps=train.epochs * steps, train=train)

    def learning_rate(self, step: int) -> float:
        return learning_rate(
            step,
            base_lr=self.train.base_lr,
            warmup_steps=self.train.warmup_steps,
            total_steps=self.total_steps,
            power=self.train.poly_power,
        )

    def stage1_weight(self, epoch: int, step: int) -> float:
        """Stage-1 loss weight at `step` of `epoch` (per epoch, or over the run)."""
        horizon = self.train.stage_weight_horizon
        if horizon is not None:
            at = schedule_epoch(step, self.total_steps, horizon)
            return stage1_weight(at, self.train.stage_weight_schedule)
        return stage1_weight(epoch, self.train.stage_weight_schedule)


@dataclass(frozen=True, kw_only=True)
class RunParts:
    """Everything a :class:`~hsam.engine.trainer.Trainer` runs, built by
    :func:`build_run_parts`."""

    config: RunConfig  # resolved: what config.yaml and the checkpoints record
    data: RunData
    built: BuiltModel  # its model on the run's device
    # What the loop calls: `model`, or its DDP / torch.compile wrapper.
    net: torch.nn.Module
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    schedule: StepSchedule
    batches: MicroBatches
    cache: PrefixCache | None

    @property
    def model(self) -> HSAM:
        """The network itself (what checkpoints and validation use)."""
        return self.built.model


def _wrap(
    model: HSAM, cfg: RunConfig, process: ProcessInfo
) -> tuple[torch.nn.Module, DistributedDataParallel | None]:
    """(net, ddp): the module the loop calls and its DDP wrapper, if distributed."""
    net: torch.nn.Module = model
    ddp = None
    if process.distributed:
        ids = [process.device.index] if process.device.type == "cuda" else None
        # The reference CMAttn leaves one LayerNorm unused; DDP must be told.
        ddp = DistributedDataParallel(
            model, device_ids=ids, find_unused_parameters=cfg.model.cmattn == "reference"
        )
        net = ddp
    if cfg.train.compile:
        check_compile_supported(process.device)
        # Compiles lazily on the first step; checkpoints still come from `model`, so their
        # keys carry no `_orig_mod.` prefix.
        net = torch.compile(net)
    return net, ddp


def build_run_parts(
    cfg: RunConfig, process: ProcessInfo, *, cache: PrefixCache | None = None
) -> RunParts:
    """Seed the RNGs and build the run of `cfg` (not modified). `cache`: prefix features
    built beforehand for this run's data and views (e.g. shared by several runs on the same
    backbone); built here when the config asks for one."""
    tcfg = cfg.train
    seed_everything(tcfg.seed)
    data = run_data_of(cfg)
    cfg = resolve_config(cfg, data, process.device)
    tcfg = cfg.train
    built = build_hsam(cfg.model, seed=tcfg.seed)
    model = built.model.to(process.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=tcfg.base_lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay
    )
    net, ddp = _wrap(model, cfg, process)
    if cache is not None and cache.start_unit != model.first_trainable_unit:
        raise ConfigError(
            f"the given prefix cache ends at encoder unit {cache.start_unit}, but this "
            f"model's first LoRA unit is {model.first_trainable_unit}."
        )
    if cache is not None and cache.input_resize != cfg.model.input_resize:
        raise ConfigError(
            f"the given prefix cache holds slices brought to S x S by {cache.input_resize!r}, "
            f"but model.input_resize is {cfg.model.input_resize!r}; build the cache for this run."
        )
    if tcfg.cache_encoder_prefix and cache is None:
        cache = PrefixCache.for_run(
            model, data.train, tcfg, device=process.device, show_progress=process.is_main
        )
    batches = MicroBatches(dataset=data.train, train=tcfg, process=process, cache=cache)
    return RunParts(
        config=cfg,
        data=data,
        built=built,
        net=net,
        ddp=ddp,
        optimizer=optimizer,
        schedule=StepSchedule.for_run(tcfg, batches.per_epoch()),
        batches=batches,
        cache=cache,
    )
