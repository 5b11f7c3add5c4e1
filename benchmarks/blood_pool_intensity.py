"""Median intensity of each LA scan's labelled structure after the percentile policy, for
the README's account of what limits LA-4 (scans whose contrast training does not cover).

    python benchmarks/blood_pool_intensity.py [--root ../shared/data/la]

Prints, per training scan (the shipped la_4 split) and test scan (test.list): the median of
the model-range image inside the label, and of the non-dark voxels outside it (> 0.05).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hsam.data import read_dataset
from hsam.engine.data import read_id_list
from hsam.intensity import to_model_range

POLICY = "percentile[0.5,99.5]"  # the LA recipe's intensity policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/la")
    args = parser.parse_args()
    root = Path(args.root)
    groups = {"train": read_id_list("standard:la_4"), "test": read_id_list(str(root / "test.list"))}
    for group, ids in groups.items():
        for case_id in ids:
            (case,) = read_dataset("la", root, [case_id])
            image = to_model_range(case.image, POLICY, already=case.intensity)
            inside = case.label > 0
            around = ~inside & (image > 0.05)
            print(  # noqa: T201 - a report on stdout
                f"{group} {case_id}: label {np.median(image[inside]):.2f}, "
                f"outside {np.median(image[around]):.2f}"
            )


if __name__ == "__main__":
    main()
