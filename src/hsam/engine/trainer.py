"""`hsam train`: the training loop, validation, checkpoints and exact resume.

Run directory layout::

    config.yaml          resolved config (what was run, incl. computed class noise stds)
    run.json             run identity (a random id, also stored in last.pt)
    split.json           split manifest (train / val ids, how chosen, sources + sha256)
    train.log            log of the main process
    metrics.jsonl        one JSON record per epoch (losses, LR, validation Dice)
    tb/                  TensorBoard events
    checkpoints/last.pt  resume state (trainable tensors, optimiser, epoch, step, RNG)
    checkpoints/best.pt  best validation Dice (or the last epoch without validation)
    checkpoints/final.pt weights after the last epoch

The end of training is idempotent: `--resume` of a run whose last epoch is in last.pt but
whose final.pt (or best.pt without validation) is missing writes them. Resume also drops
metrics.jsonl lines of epochs after the resume state (they are trained again) and removes
temp files of interrupted atomic writes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from hsam.atomic import atomic_output, atomic_write_text, check_writable_folder, stale_temp_files
from hsam.build import BuiltModel, build_hsam
from hsam.checkpoint import (
    RESUME_FORMAT,
    atomic_torch_save,
    load_trainable_state,
    save_checkpoint,
)
from hsam.config import RunConfig, config_differences, dump_yaml, from_dict, load_yaml, to_dict
from hsam.data import Case
from hsam.data.splits import manifest_sha256, write_manifest
from hsam.devices import check_compile_supported
from hsam.engine.data import RunData, build_run_data
from hsam.engine.distributed import ProcessInfo, barrier, init_process, shutdown
from hsam.engine.prefix_cache import PrefixCache
from hsam.errors import CheckpointError, ConfigError, OutputExistsError, TrainingError
from hsam.losses import hsam_loss, learning_rate, schedule_epoch, stage1_weight
from hsam.modeling.cmattn import class_noise_std_from_frequencies
from hsam.modeling.hsam import HSAM
from hsam.predictor import Predictor
from hsam.scoring import evaluate_cases

logger = logging.getLogger(__name__)

__all__ = ["RESUME_FORMAT", "TrainResult", "Trainer", "prepare_run_dir", "run_training"]

RUN_FILE = "run.json"
RUN_FORMAT = "hsam-run/1"
METRICS_FILE = "metrics.jsonl"
#: Files of a run directory and of its checkpoints folder written atomically (their temp files
#: are recognisable leftovers after a kill).
_RUN_FILES = ("config.yaml", "split.json", RUN_FILE, METRICS_FILE)
_CHECKPOINT_FILES = ("last.pt", "best.pt", "final.pt")
#: Entries of a resume state and their types (anything else is not a state this code wrote).
_RESUME_TYPES = {
    "state_dict": dict,
    "optimizer": dict,
    "next_epoch": int,
    "global_step": int,
    "rng": dict,
}


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    final_checkpoint: Path
    best_val_dice: float | None
    epochs_run: int


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain types, so `torch.load(weights_only=True)` reads
    it back (no pickled numpy objects)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def validation_dice(
    model: HSAM,
    cases: Sequence[Case],
    batch_size: int,
    *,
    precision: str = "fp32",
    cache: PrefixCache | None = None,
) -> float:
    """Mean over cases and classes of the 3-D Dice (legacy policy) on the validation cases
    (images already in [0, 1]), scored by :func:`hsam.scoring.evaluate_cases`.

    With `cache`, the frozen encoder prefix of each volume is computed once and reused."""
    predictor = Predictor(
        model=model, intensity_policy=None, batch_size=batch_size, precision=precision
    )
    evaluations = evaluate_cases(predictor, cases, metrics="dice", prefix_cache=cache)
    return float(np.mean([d for e in evaluations for d in e.scores[0].dice]))


class Trainer:
    """Train H-SAM for one run directory (fresh or resumed)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        process: ProcessInfo,
        *,
        cache: PrefixCache | None = None,
    ) -> None:
        """`cache`: prefix features built beforehand for this run's data and views (e.g.
        shared by several runs on the same backbone); built here when the config asks."""
        self.cfg = cfg
        self.run_dir = run_dir
        self.process = process
        self.ckpt_dir = run_dir / "checkpoints"
        tcfg = cfg.train
        seed_everything(tcfg.seed)
        self.data: RunData = build_run_data(
            cfg.data, tcfg, cfg.model.image_size, num_classes=cfg.model.num_classes
        )
        mcfg = cfg.model
        if mcfg.stages == 2 and mcfg.cmattn == "paper" and mcfg.class_noise_std is None:
            mcfg.class_noise_std = class_noise_std_from_frequencies(
                self.data.class_frequencies.tolist(), mcfg.cmattn_noise_max_std
            )
        self.built: BuiltModel = build_hsam(mcfg, seed=tcfg.seed)
        self.model = self.built.model.to(process.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=tcfg.base_lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay
        )
        self.net: torch.nn.Module = self.model
        self.ddp: DistributedDataParallel | None = None
        if process.distributed:
            ids = [process.device.index] if process.device.type == "cuda" else None
            # The reference CMAttn leaves one LayerNorm unused; DDP must be told.
            self.ddp = DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=cfg.model.cmattn == "reference"
            )
            self.net = self.ddp
        if tcfg.compile:
            check_compile_supported(process.device)
            # Compiles lazily on the first step; checkpoints still come from `self.model`, so
            # their keys carry no `_orig_mod.` prefix.
            self.net = torch.compile(self.net)
        if process.distributed:
            self.sampler = DistributedSampler(
                self.data.train,
                num_replicas=process.world_size,
                rank=process.rank,
                shuffle=True,
                seed=tcfg.seed,
            )
        else:
            self.sampler = None
        self.cache = cache
        if cache is not None and cache.start_unit != self.model.first_trainable_unit:
            raise ConfigError(
                f"the given prefix cache ends at encoder unit {cache.start_unit}, but this "
                f"model's first LoRA unit is {self.model.first_trainable_unit}."
            )
        if tcfg.cache_encoder_prefix and self.cache is None:
            self.cache = PrefixCache.build(
                self.model,
                self.data.train,
                views=tcfg.augmented_views,
                stop_unit=self.model.first_trainable_unit,
                batch_size=tcfg.inference_batch_size,
                device=process.device,
                bf16=tcfg.precision == "bf16",
                show_progress=process.is_main,
            )
        if self.cache is not None:
            micro = -(-len(self.cache) // (tcfg.batch_size * process.world_size))
        else:
            micro = len(self._loader(epoch=0))
        self.steps_per_epoch = max(1, micro // tcfg.accumulation_steps)
        if tcfg.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, tcfg.max_steps_per_epoch)
        self.total_steps = tcfg.epochs * self.steps_per_epoch
        self.start_epoch = 0
        self.global_step = 0
        self.best_dice: float | None = None
        # Validation Dice of the last epoch run (final.pt's metrics when resume finishes a run).
        self.last_val_dice: float | None = None
        # Identity of the run directory (run.json); set by run_training.
        self.run_id: str | None = None
        self.writer = None

    # ------------------------------------------------------------------ data
    def _loader(self, epoch: int) -> DataLoader:
        tcfg = self.cfg.train
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            sampler = self.sampler
        else:
            # A fresh generator per epoch: the order depends on (seed, epoch) only, so a
            # resumed run sees exactly the batches an uninterrupted one would.
            gen = torch.Generator().manual_seed(tcfg.seed * 1000 + epoch)
            sampler = RandomSampler(self.data.train, generator=gen)
        self.data.train.set_epoch(epoch)
        return DataLoader(
            self.data.train,
            batch_size=tcfg.batch_size,
            sampler=sampler,
            num_workers=tcfg.num_workers,
            drop_last=False,
        )

    def _micro_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, labels, start_unit): slices, or cached prefix features."""
        tcfg = self.cfg.train
        if self.cache is not None:
            for feats, labels in self.cache.batches(
                epoch,
                batch_size=tcfg.batch_size,
                seed=tcfg.seed,
                rank=self.process.rank,
                world_size=self.process.world_size,
            ):
                yield feats, labels, self.cache.start_unit
        else:
            for batch in self._loader(epoch):
                yield batch["image"], batch["label"], 0

    # ------------------------------------------------------------------ checkpoints
    def _meta(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        return {
            "label_names": {str(k): v for k, v in self.data.label_names.items()},
            "intensity_policy": self.data.intensity_policy,
            "split_sha256": manifest_sha256(self.data.manifest),
            "manifest": self.data.manifest,
            "class_frequencies": self.data.class_frequencies.tolist(),
            "class_volume_fraction_range": {
                str(c): [lo, hi] for c, (lo, hi) in self.data.class_volume_fraction_range.items()
            },
            "epoch": epoch,
            "metrics": metrics,
        }

    def _check_finite_weights(self, epoch: int) -> None:
        """Refuse to go on (and so to save) with NaN/Inf weights: they are never best/final."""
        bad = [
            n
            for n, p in self.model.named_parameters()
            if p.requires_grad and not bool(p.isfinite().all())
        ]
        if bad:
            raise TrainingError(
                f"training diverged: after epoch {epoch + 1} (optimiser step {self.global_step}) "
                f"{len(bad)} trainable tensor(s) hold NaN or Inf (e.g. {bad[0]}); nothing of "
                f"this epoch was saved. Lower train.base_lr (now {self.cfg.train.base_lr:g}) "
                "and train again in a new --out."
            )

    def _save_weights(self, name: str, epoch: int, metrics: dict[str, Any]) -> Path:
        path = self.ckpt_dir / name
        save_checkpoint(path, self.built, config=to_dict(self.cfg), meta=self._meta(epoch, metrics))
        return path

    def _save_resume_state(self, next_epoch: int) -> None:
        state = {
            "format": RESUME_FORMAT,
            "state_dict": {
                n: p.detach().cpu().clone()
                for n, p in self.model.named_parameters()
                if p.requires_grad
            },
            "optimizer": self.optimizer.state_dict(),
            "next_epoch": next_epoch,
            "global_step": self.global_step,
            "best_dice": self.best_dice,
            "last_val_dice": self.last_val_dice,
            "run_id": self.run_id,
            "rng": _rng_state(),
        }
        atomic_torch_save(state, self.ckpt_dir / "last.pt")

    def load_resume_state(self) -> None:
        path = self.ckpt_dir / "last.pt"
        if not path.is_file():
            raise CheckpointError(
                f"{path} does not exist: this run has no resume state yet; start it again "
                "without --resume (after removing the folder) or point --out elsewhere."
            )
        try:
            # Never unpickle code: a shared run folder could hold a crafted last.pt.
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not an hsam resume state this version can read (it holds objects "
                "other than tensors and plain values, or is damaged); nothing was loaded from "
                "it. Start the run again in a new --out."
            ) from exc
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise CheckpointError(f"{path} is not an hsam resume state.")
        problems = [k for k, kind in _RESUME_TYPES.items() if not isinstance(state.get(k), kind)]
        if problems:
            raise CheckpointError(
                f"{path} is an incomplete or damaged resume state ({', '.join(problems)} "
                "missing or of the wrong type); nothing was loaded. Start the run again in a "
                "new --out."
            )
        stored_id = state.get("run_id")
        if self.run_id is not None and stored_id != self.run_id:
            raise CheckpointError(
                f"{path} belongs to another run (run id {stored_id}, this run directory's "
                f"{RUN_FILE} says {self.run_id}); a resume state cannot be moved between runs. "
                "Put it back in its own run directory, or start this run again in a new --out."
            )
        load_trainable_state(self.model, state["state_dict"], source=str(path))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path}: the optimiser or RNG state does not fit this run ({exc}); start the "
                "run again in a new --out."
            ) from exc
        self.start_epoch = state["next_epoch"]
        self.global_step = state["global_step"]
        self.best_dice = state.get("best_dice")
        self.last_val_dice = state.get("last_val_dice")
        if self.process.is_main:
            self._tidy_for_resume()
        logger.info(
            "resumed %s at epoch %d (step %d)", self.run_dir, self.start_epoch, self.global_step
        )

    def _tidy_for_resume(self) -> None:
        """Undo what a kill left behind: temp files of interrupted atomic writes (only the
        names hsam's own writer creates) and metrics lines of epochs the resume state does not
        hold (written before the kill, trained again now)."""
        leftovers = stale_temp_files(self.run_dir, _RUN_FILES) + stale_temp_files(
            self.ckpt_dir, _CHECKPOINT_FILES
        )
        for f in leftovers:
            f.unlink()
        if leftovers:
            logger.info("removed %d temp file(s) of interrupted writes", len(leftovers))
        metrics = self.run_dir / METRICS_FILE
        if not metrics.is_file():
            return
        lines = metrics.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the kill
            epoch = record.get("epoch") if isinstance(record, dict) else None
            if isinstance(epoch, int) and epoch < self.start_epoch:
                kept.append(line)
        if len(kept) != len(lines):
            atomic_write_text(metrics, "".join(line + "\n" for line in kept))
            logger.info(
                "%s: dropped %d line(s) of epochs after the resume state (trained again now)",
                METRICS_FILE,
                len(lines) - len(kept),
            )

    # ------------------------------------------------------------------ loop
    def _set_lr(self) -> float:
        tcfg = self.cfg.train
        lr = learning_rate(
            self.global_step,
            base_lr=tcfg.base_lr,
            warmup_steps=tcfg.warmup_steps,
            total_steps=self.total_steps,
            power=tcfg.poly_power,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _stage1_weight(self, epoch: int) -> float:
        """Stage-1 loss weight at the current step (per epoch, or over the run)."""
        tcfg = self.cfg.train
        if tcfg.stage_weight_horizon is not None:
            at = schedule_epoch(self.global_step, self.total_steps, tcfg.stage_weight_horizon)
            return stage1_weight(at, tcfg.stage_weight_schedule)
        return stage1_weight(epoch, tcfg.stage_weight_schedule)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        tcfg = self.cfg.train
        device = self.process.device
        self.net.train()
        accum = tcfg.accumulation_steps
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(
            total=self.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{tcfg.epochs}",
            disable=not self.process.is_main,
            leave=False,
        )
        micro_iter = self._micro_batches(epoch)
        while steps < self.steps_per_epoch:
            lr = self._set_lr()
            weight = self._stage1_weight(epoch)
            for micro in range(accum):
                inputs, labels, start_unit = next(micro_iter)
                inputs, labels = inputs.to(device), labels.to(device)
                last = micro == accum - 1
                sync = nullcontext() if last or self.ddp is None else self.ddp.no_sync()
                with (
                    sync,
                    torch.autocast(
                        device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16"
                    ),
                ):
                    out = self.net(inputs, labels, start_unit=start_unit)
                    loss, parts = hsam_loss(out, labels, weight, tcfg.dice_weight)
                    (loss / accum).backward()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    # Before the optimiser step: the weights (and every saved file) stay finite.
                    raise TrainingError(
                        f"training diverged: the loss is {loss_value} at epoch {epoch + 1}, "
                        f"optimiser step {self.global_step + 1} (learning rate {lr:.3g}); "
                        "nothing of this step was saved. Lower train.base_lr (now "
                        f"{tcfg.base_lr:g}) and train again in a new --out."
                    )
                for k, v in {"loss": loss_value, **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}", lr=f"{lr:.2e}")
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss_value, self.global_step)
                self.writer.add_scalar("train/lr", lr, self.global_step)
        bar.close()
        record = {k: v / steps for k, v in sums.items()}
        record.update(epoch=epoch, stage1_weight=weight, lr=lr, steps=self.global_step)
        return record

    def fit(self, *, stop_after: int | None = None) -> TrainResult:
        """Train from `start_epoch` to the configured number of epochs.

        `stop_after` ends the call after that many epochs (as an interruption would), leaving a
        resumable run directory; used to test exact resume.
        """
        tcfg = self.cfg.train
        main = self.process.is_main
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        best_path = self.ckpt_dir / "best.pt"
        final_path = self.ckpt_dir / "final.pt"
        epochs_run = 0
        start = time.time()
        if main and self.start_epoch >= tcfg.epochs:
            # Resumed after the last epoch's last.pt: finish what the interruption cut off.
            self._write_final(tcfg.epochs - 1, self.last_val_dice, only_missing=True)
        for epoch in range(self.start_epoch, tcfg.epochs):
            record = self.train_epoch(epoch)
            self._check_finite_weights(epoch)
            last_epoch = epoch == tcfg.epochs - 1
            validate = self.data.val_cases and ((epoch + 1) % tcfg.val_every == 0 or last_epoch)
            if main:
                if validate:
                    score = validation_dice(
                        self.model,
                        self.data.val_cases,
                        tcfg.inference_batch_size,
                        precision=tcfg.precision,
                        cache=self.cache,
                    )
                    record["val_dice"] = score
                    self.last_val_dice = score
                    if self.best_dice is None or score > self.best_dice:
                        self.best_dice = score
                        self._save_weights("best.pt", epoch, {"val_dice": score})
                    if self.writer is not None:
                        self.writer.add_scalar("val/dice", score, self.global_step)
                record["elapsed_s"] = round(time.time() - start, 2)
                with open(self.run_dir / METRICS_FILE, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
                logger.info(
                    "epoch %d/%d loss %.4f%s",
                    epoch + 1,
                    tcfg.epochs,
                    record["loss"],
                    f" val Dice {record['val_dice']:.4f}" if "val_dice" in record else "",
                )
                if not validate:
                    self.last_val_dice = None
                self._save_resume_state(epoch + 1)
                if last_epoch:
                    self._write_final(epoch, record.get("val_dice"), only_missing=False)
            barrier(self.process)
            epochs_run += 1
            if stop_after is not None and epochs_run >= stop_after:
                break
        if self.writer is not None:
            self.writer.close()
        finished = self.start_epoch + epochs_run >= tcfg.epochs
        if main and finished and not best_path.is_file():
            raise CheckpointError(
                f"{best_path} is missing although the run finished (deleted?); the weights "
                f"after the last epoch are in {final_path}."
            )
        return TrainResult(self.run_dir, best_path, final_path, self.best_dice, epochs_run)

    def _write_final(self, epoch: int, val_dice: float | None, *, only_missing: bool) -> None:
        """final.pt (and best.pt = final.pt without validation). With `only_missing`, keep
        files already there: resume finishes an interrupted end of training."""
        final_path = self.ckpt_dir / "final.pt"
        best_path = self.ckpt_dir / "best.pt"
        if not (only_missing and final_path.is_file()):
            self._save_weights("final.pt", epoch, {"val_dice": val_dice})
        if not self.data.val_cases and not (only_missing and best_path.is_file()):
            with atomic_output(best_path) as tmp:
                shutil.copyfile(final_path, tmp)


def _write_run_identity(run_dir: Path) -> None:
    record = {"format": RUN_FORMAT, "run_id": uuid.uuid4().hex}
    atomic_write_text(run_dir / RUN_FILE, json.dumps(record) + "\n")


def _read_run_identity(run_dir: Path) -> str | None:
    """The run id in `run_dir`/run.json; None for runs made before hsam recorded one."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); it is written by hsam train.") from exc
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path} is not an hsam run identity file.")
    return str(record.get("run_id"))


def _add_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def prepare_run_dir(cfg: RunConfig, run_dir: Path, *, resume: bool) -> RunConfig:
    """Create (or, with `resume`, reopen) the run directory; returns the config to run."""
    stored = run_dir / "config.yaml"
    if resume:
        if not stored.is_file():
            raise CheckpointError(f"{run_dir} is not an hsam run directory (no config.yaml).")
        data = load_yaml(stored)
        # The schedule, data and model are part of the resume state: a changed value would be
        # silently ignored or break exact resume.
        diffs = config_differences(data, cfg)
        if diffs:
            raise ConfigError(
                f"--resume continues {run_dir} as it was configured, and the config given now "
                f"differs ({'; '.join(diffs)}). Drop those changes to resume, or start a new "
                "run with another --out."
            )
        return from_dict(RunConfig, data, f"{stored}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise OutputExistsError(
            f"{run_dir} already exists and is not empty: pass --resume to continue that run, "
            "or choose another --out."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return cfg


def run_training(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    cache: PrefixCache | None = None,
) -> TrainResult:
    """Train `cfg` into `run_dir` (the library function behind `hsam train`)."""
    run_dir = Path(run_dir)
    # Before any work: an --out under a plain file or in a read-only folder fails now.
    check_writable_folder(run_dir, "run directory")
    process = init_process(cfg.train.device)
    handler = None
    try:
        if process.is_main:
            cfg = prepare_run_dir(cfg, run_dir, resume=resume)
        barrier(process)
        if not process.is_main and resume:
            cfg = from_dict(RunConfig, load_yaml(run_dir / "config.yaml"), "config")
        trainer = Trainer(cfg, run_dir, process, cache=cache)
        if process.is_main:
            handler = _add_log_file(run_dir)
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            if not resume:
                atomic_write_text(run_dir / "config.yaml", dump_yaml(to_dict(trainer.cfg)))
                write_manifest(run_dir / "split.json", trainer.data.manifest)
                _write_run_identity(run_dir)
            logger.info(
                "run %s: %d steps/epoch x %d epochs, effective batch %d",
                run_dir,
                trainer.steps_per_epoch,
                cfg.train.epochs,
                cfg.train.batch_size * cfg.train.accumulation_steps * process.world_size,
            )
        trainer.run_id = _read_run_identity(run_dir)
        if resume:
            trainer.load_resume_state()
        return trainer.fit(stop_after=stop_after)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        shutdown(process)
