"""Dice of a checkpoint on labelled volumes whose intensities are shifted the way the dimmest
LA scans differ from the bright ones: a robustness probe on scans held out from training.

    python benchmarks/intensity_shift.py CKPT --format la --root ../shared/data/la \
        --cases 1GU15S0GJ6PFNARO469W --factors 1 0.6 0.5

Each volume is mapped to the model's [0, 1] range by the checkpoint's intensity policy, then
through a "knee": ``x -> factor * x`` up to ``--knee`` (0.85) and linearly from there to 1 at 1,
so the mid-range (an LA blood pool at 0.82 goes to 0.49 at factor 0.6, 0.41 at 0.5) darkens
while the brightest voxels stay the brightest. That is how the two dimmest LA test scans look
after percentile scaling (blood pool 0.42 and 0.47, against 0.61-0.83 in the training scans;
``benchmarks/blood_pool_intensity.py``). A factor of 1 is the volume as ``hsam evaluate`` sees it.
Gamma and contrast augmentation do not produce this curve; ``train.augment.p_histogram_shift``
does. ``--gammas`` adds ``x -> x ** g`` variants for comparison (what gamma augmentation shows
the model). Prints, per case and variant: the median model-range intensity inside the label,
the mean Dice over classes (legacy policy, the checkpoint's inference defaults unless
overridden) and predicted / labelled foreground voxels.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

import numpy as np

from hsam.data import read_dataset
from hsam.evaluation.scoring import evaluate_cases
from hsam.inference.postprocess import POSTPROCESS_CHOICES
from hsam.inference.predictor import Predictor

logger = logging.getLogger("intensity_shift")


def knee(image: np.ndarray, factor: float, at: float) -> np.ndarray:
    """[0, 1] image -> ``factor * x`` below `at`, linear from ``factor * at`` to 1 above it."""
    if not (0.0 < factor <= 1.0 and 0.0 < at < 1.0):
        raise ValueError(f"need 0 < factor <= 1 and 0 < knee < 1, got {factor}, {at}")
    above = factor * at + (image - at) * (1.0 - factor * at) / (1.0 - at)
    return np.where(image <= at, factor * image, above).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--format", required=True, help="data format, as data.format (e.g. la)")
    parser.add_argument("--root", required=True)
    parser.add_argument("--cases", nargs="+", required=True)
    parser.add_argument("--factors", nargs="+", type=float, default=[1.0, 0.6, 0.5])
    parser.add_argument("--knee", type=float, default=0.85)
    parser.add_argument("--gammas", nargs="*", type=float, default=[])
    parser.add_argument("--slice-smoothing", type=float, default=None)
    parser.add_argument("--postprocess", choices=POSTPROCESS_CHOICES, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loaded = Predictor.from_checkpoint(
        args.checkpoint,
        device="cpu",
        precision="auto",
        slice_smoothing=args.slice_smoothing,
        postprocess=args.postprocess,
    )
    # The shifted volumes are given in the model's range already.
    predictor = loaded.with_settings(intensity_policy=None)
    for case in read_dataset(args.format, args.root, args.cases):
        image = loaded.to_model_range(case.image, already=case.intensity)
        foreground = case.label > 0
        variants = {f"factor {f:g}": knee(image, f, args.knee) for f in args.factors}
        variants |= {f"gamma {g:g}": np.power(image, g, dtype=np.float32) for g in args.gammas}
        for name, variant in variants.items():
            shifted = replace(case, image=variant, intensity="none")
            (evaluation,) = evaluate_cases(predictor, [shifted], metrics="dice")
            score = evaluation.scores[0]
            predicted = int((score.labels > 0).sum())
            logger.info(
                "%s %s: labelled median %.2f, Dice %.2f, predicted/labelled %.2f",
                case.case_id,
                name,
                float(np.median(shifted.image[foreground])),
                100 * float(np.mean(score.dice)),
                predicted / max(int(foreground.sum()), 1),
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
