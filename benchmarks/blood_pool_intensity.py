"""Median intensity of each LA scan's labelled structure after the percentile policy, for
the README's account of what limits LA-4 (scans whose contrast training does not cover).

    python benchmarks/blood_pool_intensity.py [--root ../shared/data/la] [--standardize]

Prints, per training scan (the shipped la_4 split) and test scan (test.list): the median of
the model-range image inside the label, and of the non-dark voxels outside it (> 0.05).
With ``--standardize`` also after histogram standardisation (``data.histogram_standardization``)
as training would fit it: each training scan onto the mean landmarks of the other three (as
if it were held out), each test scan onto those of all four.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hsam.data import Case, read_dataset
from hsam.engine.data import read_id_list
from hsam.intensity import to_model_range, volume_landmarks, with_landmarks

POLICY = "percentile[0.5,99.5]"  # the LA recipe's intensity policy


def _medians(case: Case, policy: str) -> tuple[float, float]:
    """(inside the label, non-dark outside it) medians of the case's model-range image."""
    image = to_model_range(case.image, policy, already=case.intensity)
    inside = case.label > 0
    around = ~inside & (image > 0.05)
    return float(np.median(image[inside])), float(np.median(image[around]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/la")
    parser.add_argument("--standardize", action="store_true")
    args = parser.parse_args(argv)
    root = Path(args.root)
    groups = {"train": read_id_list("standard:la_4"), "test": read_id_list(str(root / "test.list"))}
    train_cases = {case.case_id: case for case in read_dataset("la", root, groups["train"])}
    train_landmarks = {
        case_id: volume_landmarks(to_model_range(case.image, POLICY, already=case.intensity))
        for case_id, case in train_cases.items()
        if args.standardize
    }
    for group, ids in groups.items():
        for case_id in ids:
            case = train_cases.get(case_id) or read_dataset("la", root, [case_id])[0]
            inside, outside = _medians(case, POLICY)
            line = f"{group} {case_id}: label {inside:.2f}, outside {outside:.2f}"
            if args.standardize:
                others = [lm for other, lm in train_landmarks.items() if other != case_id]
                policy = with_landmarks(POLICY, np.mean(others, axis=0))
                inside, outside = _medians(case, policy)
                line += f"; standardised: label {inside:.2f}, outside {outside:.2f}"
            print(line)  # noqa: T201 - a report on stdout


if __name__ == "__main__":
    main()
