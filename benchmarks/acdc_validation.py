"""3-D Dice of ACDC checkpoints on validation frames carved from the training split.

The frames come from the patients of `train_slices.list` outside its first N lines (the
labelled few-shot subset), every `--every`-th of them, stacked from their slice files: never
the test list. This is how the README's ACDC recipe choices were measured, e.g.

    python benchmarks/acdc_validation.py runs/a/checkpoints/final.pt runs/b/checkpoints/final.pt

prints, per checkpoint, the mean Dice of RV/Myo/LV for stage 1, stage 2 and the fused output
(`--stages`), without and with test-time augmentation (`--tta none flip rot90`) and
post-processing (`--postprocess none largest_component`), and each class's mean over the
frames.
"""

from __future__ import annotations

import argparse
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from hsam.data import Case
from hsam.data.formats.acdc import read_acdc_slice
from hsam.data.formats.common import parse_slice_id, read_list
from hsam.errors import ConfigError
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.postprocess import POSTPROCESS_CHOICES
from hsam.inference.predictor import Predictor
from hsam.inference.slicewise import TTA_TRANSFORMS

logger = logging.getLogger("acdc_validation")


def _stack_frames(root: Path, frames: dict[str, list[tuple[int, str]]]) -> list[Case]:
    cases = []
    for frame in sorted(frames):
        pairs = [
            read_acdc_slice(root / "data" / "slices" / f"{s}.h5") for _, s in sorted(frames[frame])
        ]
        image = np.stack([p[0] for p in pairs]).astype(np.float32)
        label = np.stack([p[1] for p in pairs])
        cases.append(Case(frame, image, label, intensity="minmax"))
    return cases


def _frames_of(lines: list[str]) -> dict[str, list[tuple[int, str]]]:
    frames: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for s in lines:
        frame, index = parse_slice_id(s)
        frames[frame].append((index, s))
    return frames


def _patient(frame: str) -> str:
    """``patientXXX`` of a ``patientXXX_frameYY`` frame id."""
    return frame.split("_")[0]


def validation_frames(root: Path, labelled_lines: int, every: int) -> list[Case]:
    """Frames of every `every`-th training-split patient outside the first `labelled_lines`."""
    lines = read_list(root / "train_slices.list")
    labelled = {_patient(parse_slice_id(s)[0]) for s in lines[:labelled_lines]}
    frames = {
        frame: slices
        for frame, slices in _frames_of(lines[labelled_lines:]).items()
        if _patient(frame) not in labelled
    }
    patients = sorted({_patient(f) for f in frames})[::every]
    return _stack_frames(root, {f: v for f, v in frames.items() if _patient(f) in patients})


def labelled_frames(root: Path, labelled_lines: int) -> list[Case]:
    """The labelled few-shot slices themselves, stacked per frame: how well a run fits what it
    trained on, the ceiling its validation Dice is measured against."""
    lines = read_list(root / "train_slices.list")
    return _stack_frames(root, _frames_of(lines[:labelled_lines]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--root", default="../shared/data/acdc")
    parser.add_argument("--labelled-lines", type=int, default=136, help="ACDC 10%%: 136")
    parser.add_argument("--every", type=int, default=6, help="every N-th unlabelled patient")
    parser.add_argument("--stages", nargs="+", default=["1", "2", "fused"])
    parser.add_argument("--tta", nargs="+", default=["none"], choices=tuple(TTA_TRANSFORMS))
    parser.add_argument(
        "--postprocess",
        nargs="+",
        default=["none"],
        choices=POSTPROCESS_CHOICES,
        help="each variant also with these post-processings (scored on the same predictions)",
    )
    parser.add_argument(
        "--frames",
        choices=("validation", "labelled"),
        default="validation",
        help="validation: unlabelled training-split patients; labelled: the training slices",
    )
    parser.add_argument(
        "--per-frame",
        action="store_true",
        help="also log each frame's shape and per-class Dice (RV, Myo, LV) of every variant",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.frames == "labelled":
        cases = labelled_frames(Path(args.root), args.labelled_lines)
    else:
        cases = validation_frames(Path(args.root), args.labelled_lines, args.every)
    logger.info("%d %s frames", len(cases), args.frames)
    for checkpoint in args.checkpoints:
        variants: dict[str, Predictor] = {}
        for tta in args.tta:
            for stage in args.stages:
                try:
                    predictor = Predictor.from_checkpoint(
                        checkpoint,
                        device="cpu",
                        stage=stage,
                        precision="auto",
                        tta=tta,
                        postprocess="none",
                        slice_smoothing=0.0,
                    )
                except ConfigError:  # a one-stage model has no stage 2
                    continue
                key = stage if tta == "none" else f"{stage}+{tta}"
                for postprocess in args.postprocess:
                    # Same model object: its slices run once for every post-processing.
                    variants[key if postprocess == "none" else f"{key}+{postprocess}"] = (
                        predictor.with_settings(postprocess=postprocess)
                    )
        # One call: the variants share each slice's encoder prefix (per flip).
        dices: dict[str, list[list[float]]] = defaultdict(list)  # per frame, per class
        evaluations = evaluate_cases(list(variants.values()), cases, metrics="dice")
        for case, evaluation in zip(cases, evaluations, strict=True):
            for key, score in zip(variants, evaluation.scores, strict=True):
                dices[key].append(score.dice)
                if args.per_frame:
                    per_class = [round(100 * d, 1) for d in score.dice]
                    logger.info("  %s %s %s %s", case.case_id, case.image.shape, key, per_class)
        class_means = {
            key: [round(100 * float(v), 1) for v in np.mean(values, axis=0)]
            for key, values in dices.items()
        }
        logger.info("%s per-class mean Dice (RV, Myo, LV) %s", checkpoint, class_means)
        row = {key: round(100 * float(np.mean(values)), 2) for key, values in dices.items()}
        logger.info("%s %s", checkpoint, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
