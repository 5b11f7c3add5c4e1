"""`hsam train`: the training loop, with validation, logging and checkpointing as steps
around each epoch.

The run's parts (data, model, optimiser, schedule, prefix cache) are built beforehand by
:func:`hsam.engine.run_parts.build_run_parts`; its files are written by
:mod:`hsam.engine.checkpointing`.

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
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from hsam.config import InferenceConfig, RunConfig, from_dict, load_yaml
from hsam.data import Case
from hsam.engine.checkpointing import (
    METRICS_FILE,
    RunCheckpoints,
    TrainingState,
    prepare_run_dir,
    read_run_identity,
    tidy_for_resume,
    write_run_files,
)
from hsam.engine.distributed import ProcessInfo, barrier, init_process, shutdown
from hsam.engine.losses import hsam_loss
from hsam.engine.prefix_cache import PrefixCache
from hsam.engine.run_parts import RunParts, build_run_parts
from hsam.errors import CheckpointError, TrainingError
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.predictor import Predictor
from hsam.io.atomic import check_writable_folder
from hsam.io.checkpoint import RESUME_FORMAT
from hsam.modeling.hsam import HSAM

logger = logging.getLogger(__name__)

__all__ = ["RESUME_FORMAT", "TrainResult", "Trainer", "prepare_run_dir", "run_training"]


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    final_checkpoint: Path
    best_val_dice: float | None
    epochs_run: int
    #: Wall-clock seconds of all the run's epochs, summed over the calls that trained them.
    trained_seconds: float


def validation_dice(
    model: HSAM,
    cases: Sequence[Case],
    batch_size: int,
    *,
    precision: str = "fp32",
    cache: PrefixCache | None = None,
    inference: InferenceConfig | None = None,
) -> float:
    """Mean over cases and classes of the 3-D Dice (legacy policy) on the validation cases
    (images already in [0, 1]), scored by :func:`hsam.evaluation.scoring.evaluate_cases`.

    With `cache`, the frozen encoder prefix of each volume is computed once and reused (not
    with test-time augmentation, whose transformed slices need their own prefix).
    `inference`: the recipe's inference defaults (slice smoothing, post-processing, test-time
    augmentation), as ``hsam evaluate`` applies them to the run's checkpoints."""
    inference = inference or InferenceConfig()
    predictor = Predictor(
        model=model,
        intensity_policy=None,
        batch_size=batch_size,
        precision=precision,
        postprocess=inference.postprocess,
        tta=inference.tta,
        slice_smoothing=inference.slice_smoothing,
    )
    if inference.tta != "none":
        cache = None
    evaluations = evaluate_cases(predictor, cases, metrics="dice", prefix_cache=cache)
    return float(np.mean([d for e in evaluations for d in e.scores[0].dice]))


class Trainer:
    """Train the built parts of one run into its run directory (fresh or, after
    :meth:`resume`, continued)."""

    def __init__(
        self, *, parts: RunParts, run_dir: Path, process: ProcessInfo, run_id: str | None
    ) -> None:
        """`run_id`: the run directory's identity (run.json); a resume state must carry it."""
        self.parts = parts
        self.run_dir = run_dir
        self.process = process
        self.run_id = run_id
        self.checkpoints = RunCheckpoints(run_dir=run_dir, parts=parts)
        self.state = TrainingState()
        self.writer = None  # TensorBoard, on the main process while `fit` runs

    def resume(self) -> None:
        """Continue from the run's last.pt (weights, optimiser, RNGs and loop state)."""
        self.state = self.checkpoints.load_resume_state(run_id=self.run_id)
        if self.process.is_main:
            tidy_for_resume(self.run_dir, self.state.next_epoch)
        logger.info(
            "resumed %s at epoch %d (step %d)",
            self.run_dir,
            self.state.next_epoch,
            self.state.global_step,
        )

    # ------------------------------------------------------------------ one epoch
    def _set_lr(self) -> float:
        lr = self.parts.schedule.learning_rate(self.state.global_step)
        for group in self.parts.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch; returns its record (mean losses, last LR and stage-1 weight)."""
        parts, state = self.parts, self.state
        tcfg = parts.config.train
        device = self.process.device
        parts.net.train()
        accum = tcfg.accumulation_steps
        sums: dict[str, float] = {}
        steps = 0
        bar = tqdm(
            total=parts.schedule.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{tcfg.epochs}",
            disable=not self.process.is_main,
            leave=False,
        )
        micro_iter = parts.batches.epoch(epoch)
        while steps < parts.schedule.steps_per_epoch:
            lr = self._set_lr()
            weight = parts.schedule.stage1_weight(epoch, state.global_step)
            for micro in range(accum):
                inputs, labels, start_unit = next(micro_iter)
                inputs, labels = inputs.to(device), labels.to(device)
                last = micro == accum - 1
                sync = nullcontext() if last or parts.ddp is None else parts.ddp.no_sync()
                with (
                    sync,
                    torch.autocast(
                        device.type, dtype=torch.bfloat16, enabled=tcfg.precision == "bf16"
                    ),
                ):
                    out = parts.net(inputs, labels, start_unit=start_unit)
                    loss, losses = hsam_loss(out, labels, weight, tcfg.dice_weight)
                    (loss / accum).backward()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    # Before the optimiser step: the weights (and every saved file) stay finite.
                    raise TrainingError(
                        f"training diverged: the loss is {loss_value} at epoch {epoch + 1}, "
                        f"optimiser step {state.global_step + 1} (learning rate {lr:.3g}); "
                        "nothing of this step was saved. Lower train.base_lr (now "
                        f"{tcfg.base_lr:g}) and train again in a new --out."
                    )
                for k, v in {"loss": loss_value, **losses}.items():
                    sums[k] = sums.get(k, 0.0) + v / accum
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}", lr=f"{lr:.2e}")
            if self.writer is not None:
                self.writer.add_scalar("train/loss", loss_value, state.global_step)
                self.writer.add_scalar("train/lr", lr, state.global_step)
        bar.close()
        record = {k: v / steps for k, v in sums.items()}
        record.update(epoch=epoch, stage1_weight=weight, lr=lr, steps=state.global_step)
        return record

    # ------------------------------------------------------------------ steps around it
    def _check_finite_weights(self, epoch: int) -> None:
        """Refuse to go on (and so to save) with NaN/Inf weights: they are never best/final."""
        bad = [
            n
            for n, p in self.parts.model.named_parameters()
            if p.requires_grad and not bool(p.isfinite().all())
        ]
        if bad:
            raise TrainingError(
                f"training diverged: after epoch {epoch + 1} (optimiser step "
                f"{self.state.global_step}) {len(bad)} trainable tensor(s) hold NaN or Inf (e.g. "
                f"{bad[0]}); nothing of this epoch was saved. Lower train.base_lr (now "
                f"{self.parts.config.train.base_lr:g}) and train again in a new --out."
            )

    def _validate(self, epoch: int, record: dict[str, Any]) -> None:
        """Score the validation cases into `record`; a new best is written to best.pt."""
        tcfg = self.parts.config.train
        score = validation_dice(
            self.parts.model,
            self.parts.data.val_cases,
            tcfg.inference_batch_size,
            precision=tcfg.precision,
            cache=self.parts.cache,
            inference=self.parts.config.inference,
        )
        record["val_dice"] = score
        self.state.last_val_dice = score
        if self.state.best_dice is None or score > self.state.best_dice:
            self.state.best_dice = score
            self.checkpoints.save_weights(self.checkpoints.best, epoch, {"val_dice": score})
        if self.writer is not None:
            self.writer.add_scalar("val/dice", score, self.state.global_step)

    def _log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """One metrics.jsonl line and one log line per epoch."""
        record["elapsed_s"] = round(self.state.trained_seconds, 2)
        with open(self.run_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        logger.info(
            "epoch %d/%d loss %.4f%s",
            epoch + 1,
            self.parts.config.train.epochs,
            record["loss"],
            f" val Dice {record['val_dice']:.4f}" if "val_dice" in record else "",
        )

    def fit(self, *, stop_after: int | None = None) -> TrainResult:
        """Train from the state's next epoch to the configured number of epochs.

        `stop_after` ends the call after that many epochs (as an interruption would), leaving a
        resumable run directory; used to test exact resume.
        """
        epochs = self.parts.config.train.epochs
        val_every = self.parts.config.train.val_every
        main = self.process.is_main
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"))
        epochs_run = 0
        # Training time before this call (a resume) plus this call's, up to each epoch's end.
        seconds_before, started = self.state.trained_seconds, time.time()
        if main and self.state.next_epoch >= epochs:
            # Resumed after the last epoch's last.pt: finish what the interruption cut off.
            self.checkpoints.write_final(epochs - 1, self.state.last_val_dice, only_missing=True)
        for epoch in range(self.state.next_epoch, epochs):
            record = self.train_epoch(epoch)
            self._check_finite_weights(epoch)
            self.state.next_epoch = epoch + 1
            last_epoch = epoch == epochs - 1
            validate = bool(self.parts.data.val_cases) and (
                (epoch + 1) % val_every == 0 or last_epoch
            )
            if main:
                if validate:
                    self._validate(epoch, record)
                self.state.trained_seconds = seconds_before + time.time() - started
                self._log_epoch(epoch, record)
                if not validate:
                    self.state.last_val_dice = None
                self.checkpoints.save_resume_state(self.state, run_id=self.run_id)
                if last_epoch:
                    self.checkpoints.write_final(epoch, record.get("val_dice"), only_missing=False)
            barrier(self.process)
            epochs_run += 1
            if stop_after is not None and epochs_run >= stop_after:
                break
        if self.writer is not None:
            self.writer.close()
        best, final = self.checkpoints.best, self.checkpoints.final
        if main and self.state.next_epoch >= epochs and not best.is_file():
            raise CheckpointError(
                f"{best} is missing although the run finished (deleted?); the weights "
                f"after the last epoch are in {final}."
            )
        return TrainResult(
            self.run_dir, best, final, self.state.best_dice, epochs_run, self.state.trained_seconds
        )


def _add_log_file(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def run_training(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    cache: PrefixCache | None = None,
) -> TrainResult:
    """Train `cfg` into `run_dir` (the library function behind `hsam train`). `cfg` is not
    modified: what the run resolves (class noise stds) goes to its config.yaml and
    checkpoints. `cache`: see :func:`~hsam.engine.run_parts.build_run_parts`."""
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
        parts = build_run_parts(cfg, process, cache=cache)
        if process.is_main:
            handler = _add_log_file(run_dir)
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            if not resume:
                write_run_files(run_dir, parts)
            tcfg = parts.config.train
            logger.info(
                "run %s: %d steps/epoch x %d epochs, effective batch %d",
                run_dir,
                parts.schedule.steps_per_epoch,
                tcfg.epochs,
                tcfg.batch_size * tcfg.accumulation_steps * process.world_size,
            )
        trainer = Trainer(
            parts=parts, run_dir=run_dir, process=process, run_id=read_run_identity(run_dir)
        )
        if resume:
            trainer.resume()
        return trainer.fit(stop_after=stop_after)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        shutdown(process)
