"""A training run's files: the run directory's set-up and identity, the resume state
(`last.pt`), the weights files (`best.pt`, `final.pt`) and the tidy-up a resume does after a
kill. The layout is described in :mod:`hsam.engine.trainer`."""

from __future__ import annotations

import json
import logging
import random
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsam.config import RunConfig, config_differences, dump_yaml, from_dict, load_yaml, to_dict
from hsam.data.splits import manifest_sha256, write_manifest
from hsam.engine.run_parts import RunParts
from hsam.errors import CheckpointError, ConfigError, OutputExistsError
from hsam.io.atomic import atomic_output, atomic_write_text, stale_temp_files
from hsam.io.checkpoint import (
    RESUME_FORMAT,
    atomic_torch_save,
    load_trainable_state,
    save_checkpoint,
)

logger = logging.getLogger(__name__)

__all__ = [
    "METRICS_FILE",
    "RESUME_FORMAT",
    "RUN_FILE",
    "RunCheckpoints",
    "TrainingState",
    "prepare_run_dir",
    "read_run_identity",
    "tidy_for_resume",
    "write_run_files",
]

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


# ------------------------------------------------------------------ run directory
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


def write_run_files(run_dir: Path, parts: RunParts) -> None:
    """What a new run records before its first epoch: the resolved config, the split and a
    fresh run identity."""
    atomic_write_text(run_dir / "config.yaml", dump_yaml(to_dict(parts.config)))
    write_manifest(run_dir / "split.json", parts.data.manifest)
    record = {"format": RUN_FORMAT, "run_id": uuid.uuid4().hex}
    atomic_write_text(run_dir / RUN_FILE, json.dumps(record) + "\n")


def read_run_identity(run_dir: Path) -> str | None:
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


def tidy_for_resume(run_dir: Path, next_epoch: int) -> None:
    """Undo what a kill left behind: temp files of interrupted atomic writes (only the
    names hsam's own writer creates) and metrics lines of epochs the resume state does not
    hold (epochs from `next_epoch` on: written before the kill, trained again now)."""
    leftovers = stale_temp_files(run_dir, _RUN_FILES) + stale_temp_files(
        run_dir / "checkpoints", _CHECKPOINT_FILES
    )
    for f in leftovers:
        f.unlink()
    if leftovers:
        logger.info("removed %d temp file(s) of interrupted writes", len(leftovers))
    metrics = run_dir / METRICS_FILE
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
        if isinstance(epoch, int) and epoch < next_epoch:
            kept.append(line)
    if len(kept) != len(lines):
        atomic_write_text(metrics, "".join(line + "\n" for line in kept))
        logger.info(
            "%s: dropped %d line(s) of epochs after the resume state (trained again now)",
            METRICS_FILE,
            len(lines) - len(kept),
        )


# ------------------------------------------------------------------ RNG state
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


# ------------------------------------------------------------------ checkpoints
@dataclass(kw_only=True)
class TrainingState:
    """Where the loop stands; with the weights, optimiser and RNGs it is the resume state."""

    next_epoch: int = 0
    global_step: int = 0
    best_dice: float | None = None
    # Validation Dice of the last epoch run (final.pt's metrics when resume finishes a run).
    last_val_dice: float | None = None
    # Wall-clock seconds of the epochs this state holds, over every call that trained them
    # (a resumed run's time is not only its last segment's).
    trained_seconds: float = 0.0


class RunCheckpoints:
    """The checkpoints folder of one run: last.pt (resume state), best.pt and final.pt."""

    def __init__(self, *, run_dir: Path, parts: RunParts) -> None:
        self.folder = run_dir / "checkpoints"
        self.parts = parts
        self.last = self.folder / "last.pt"
        self.best = self.folder / "best.pt"
        self.final = self.folder / "final.pt"

    def _meta(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        data = self.parts.data
        return {
            "label_names": {str(k): v for k, v in data.label_names.items()},
            "intensity_policy": data.intensity_policy,
            "split_sha256": manifest_sha256(data.manifest),
            "manifest": data.manifest,
            "class_frequencies": data.class_frequencies.tolist(),
            "class_volume_fraction_range": {
                str(c): [lo, hi] for c, (lo, hi) in data.class_volume_fraction_range.items()
            },
            "epoch": epoch,
            "metrics": metrics,
        }

    def save_weights(self, path: Path, epoch: int, metrics: dict[str, Any]) -> None:
        save_checkpoint(
            path,
            self.parts.built,
            config=to_dict(self.parts.config),
            meta=self._meta(epoch, metrics),
        )

    def write_final(self, epoch: int, val_dice: float | None, *, only_missing: bool) -> None:
        """final.pt (and best.pt = final.pt without validation). With `only_missing`, keep
        files already there: resume finishes an interrupted end of training."""
        if not (only_missing and self.final.is_file()):
            self.save_weights(self.final, epoch, {"val_dice": val_dice})
        if not self.parts.data.val_cases and not (only_missing and self.best.is_file()):
            with atomic_output(self.best) as tmp:
                shutil.copyfile(self.final, tmp)

    def save_resume_state(self, state: TrainingState, *, run_id: str | None) -> None:
        resume = {
            "format": RESUME_FORMAT,
            "state_dict": {
                n: p.detach().cpu().clone()
                for n, p in self.parts.model.named_parameters()
                if p.requires_grad
            },
            "optimizer": self.parts.optimizer.state_dict(),
            "next_epoch": state.next_epoch,
            "global_step": state.global_step,
            "best_dice": state.best_dice,
            "last_val_dice": state.last_val_dice,
            "trained_seconds": state.trained_seconds,
            "run_id": run_id,
            "rng": _rng_state(),
        }
        atomic_torch_save(resume, self.last)

    def load_resume_state(self, *, run_id: str | None) -> TrainingState:
        """Load last.pt into the model, optimiser and RNGs; returns the loop's state. With a
        `run_id` (this directory's run.json), a last.pt of another run is refused."""
        path = self.last
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
        if run_id is not None and stored_id != run_id:
            raise CheckpointError(
                f"{path} belongs to another run (run id {stored_id}, this run directory's "
                f"{RUN_FILE} says {run_id}); a resume state cannot be moved between runs. "
                "Put it back in its own run directory, or start this run again in a new --out."
            )
        load_trainable_state(self.parts.model, state["state_dict"], source=str(path))
        try:
            self.parts.optimizer.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path}: the optimiser or RNG state does not fit this run ({exc}); start the "
                "run again in a new --out."
            ) from exc
        return TrainingState(
            next_epoch=state["next_epoch"],
            global_step=state["global_step"],
            best_dice=state.get("best_dice"),
            last_val_dice=state.get("last_val_dice"),
            # Absent from resume states written before hsam recorded it.
            trained_seconds=float(state.get("trained_seconds") or 0.0),
        )
