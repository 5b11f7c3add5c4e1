"""Frozen-prefix feature cache: the encoder units before the first LoRA block run once.

With LoRA on the last N encoder blocks only, everything before them is frozen and its output
depends only on the input slice. For a fixed set of V augmented views of every training slice
those outputs are computed once; training then runs the adapted blocks, the neck and the
decoders only (HSAM.forward(..., start_unit=k)). The math is that of recomputing, so the
result is identical for the same views (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from hsam.build import build_hsam
from hsam.config import InputResize, RunConfig, TrainConfig
from hsam.data import SliceDataset
from hsam.devices import resolve_precision
from hsam.engine.data import RunData, run_data_of
from hsam.inference.slicewise import encode_volume_prefix
from hsam.modeling.hsam import HSAM

logger = logging.getLogger(__name__)


class PrefixCache:
    """Cached encoder-prefix features and labels of V views of N slices."""

    def __init__(
        self,
        features: list[Tensor],
        labels: list[Tensor],
        start_unit: int,
        *,
        input_resize: InputResize = "stretch",
    ) -> None:
        """
        Arguments:
          features: per view, (N, ...) outputs of the first `start_unit` encoder units.
          labels: per view, (N, S, S) int64 labels of the same augmented slices.
          start_unit: where the encoder resumes.
          input_resize: how the slices were brought to S x S (a model must match it).
        """
        self.features = features
        self.labels = labels
        self.start_unit = start_unit
        self.input_resize = input_resize
        # Prefix features of whole (validation) volumes by case id, filled on first use and
        # shared by every run given this cache.
        self.volumes: dict[str, Tensor] = {}

    @property
    def num_views(self) -> int:
        return len(self.features)

    def __len__(self) -> int:
        return self.features[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(f.element_size() * f.nelement() for f in self.features)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: HSAM,
        dataset: SliceDataset,
        *,
        views: int,
        stop_unit: int,
        batch_size: int,
        device: torch.device,
        bf16: bool,
        show_progress: bool = True,
    ) -> PrefixCache:
        """Run the first `stop_unit` encoder units on `views` augmentations of each slice.

        View v is the dataset's augmentation for epoch v (its per-sample generators are seeded
        by (seed, v, index)), so the views are reproducible.
        """
        if views < 1:
            raise ValueError(f"augmented_views must be >= 1, got {views}.")
        _check_same_input_resize(model, dataset)
        features: list[Tensor] = []
        labels: list[Tensor] = []
        n = len(dataset)
        bar = tqdm(total=views * n, desc="caching encoder prefix", disable=not show_progress)
        for view in range(views):
            dataset.set_epoch(view)
            chunks, label_chunks = [], []
            for start in range(0, n, batch_size):
                items = [dataset[i] for i in range(start, min(start + batch_size, n))]
                images = torch.stack([it["image"] for it in items]).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    chunks.append(model.encode_prefix(images, stop_unit).cpu())
                label_chunks.append(torch.stack([it["label"] for it in items]))
                bar.update(len(items))
            features.append(torch.cat(chunks))
            labels.append(torch.cat(label_chunks))
        bar.close()
        cache = cls(features, labels, stop_unit, input_resize=model.input_resize)
        logger.info(
            "cached encoder units [0, %d) for %d view(s) x %d slices (%.0f MB)",
            stop_unit,
            views,
            n,
            cache.nbytes / 2**20,
        )
        return cache

    @classmethod
    def for_run(
        cls,
        model: HSAM,
        dataset: SliceDataset,
        train: TrainConfig,
        *,
        device: torch.device,
        show_progress: bool = True,
    ) -> PrefixCache:
        """The cache a run of `train` uses: up to `model`'s first LoRA unit, with the run's
        views (`augmented_views`), batch size (`inference_batch_size`) and precision."""
        return cls.build(
            model,
            dataset,
            views=train.augmented_views,
            stop_unit=model.first_trainable_unit,
            batch_size=train.inference_batch_size,
            device=device,
            bf16=resolve_precision(train.precision, device) == "bf16",
            show_progress=show_progress,
        )

    def volume_features(
        self, model: HSAM, case_id: str, volume: np.ndarray, *, batch_size: int, bf16: bool
    ) -> Tensor:
        """Prefix features (D, ...) of every slice of a (D, H, W) volume, computed once."""
        if case_id not in self.volumes:
            self.volumes[case_id] = encode_volume_prefix(
                model,
                volume,
                prefix_units=self.start_unit,
                batch_size=batch_size,
                precision="bf16" if bf16 else "fp32",
            )
        return self.volumes[case_id]

    def batches(
        self, epoch: int, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(features, labels) batches of epoch `epoch`: view epoch mod V, shuffled by
        (seed, epoch), this rank's share."""
        view = epoch % self.num_views
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(self), generator=gen)[rank::world_size]
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            yield self.features[view][idx], self.labels[view][idx]


def build_shared_prefix_cache(cfg: RunConfig) -> tuple[RunData, PrefixCache]:
    """The run's data and its encoder-prefix cache, on the CPU, to hand to several runs that
    train on the same data and frozen backbone (`run_training(..., cache=...)`: the demo's two
    models, the few-shot benchmark's configurations of one seed).

    See :meth:`PrefixCache.for_run` for what it holds."""
    tcfg = cfg.train
    data = run_data_of(cfg)
    encoder = build_hsam(cfg.model, seed=tcfg.seed).model  # only its frozen units are used
    cache = PrefixCache.for_run(encoder, data.train, tcfg, device=torch.device("cpu"))
    return data, cache


def _check_same_input_resize(model: HSAM, dataset: Dataset) -> None:
    """Refuse slices fitted to S x S otherwise than `model` fits them at inference.

    `dataset` may be a SliceDataset or a (possibly nested) `Subset` of one; other datasets
    carry no resize policy to compare.
    """
    inner = dataset
    while isinstance(inner, Subset):
        inner = inner.dataset
    resize = getattr(inner, "input_resize", None)
    if resize is not None and resize != model.input_resize:
        raise ValueError(
            f"the dataset brings slices to S x S by {resize!r} but model.input_resize is "
            f"{model.input_resize!r}; build the dataset with input_resize={model.input_resize!r}."
        )
