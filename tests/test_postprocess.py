from __future__ import annotations

import numpy as np
import pytest

from hsam.inference.postprocess import keep_largest_component, postprocess_labels


def test_largest_component_keeps_one_structure_per_class():
    labels = np.zeros((6, 20, 20), dtype=np.uint8)
    labels[1:5, 2:10, 2:10] = 1  # the structure
    labels[0, 15:17, 15:17] = 1  # a stray island of class 1
    labels[2:4, 12:18, 2:6] = 2  # class 2, one component
    labels[5, 0, 19] = 2  # and a one-voxel island
    out = keep_largest_component(labels, 2)
    assert (out[1:5, 2:10, 2:10] == 1).all()
    assert (out[0, 15:17, 15:17] == 0).all() and out[5, 0, 19] == 0
    assert (out[2:4, 12:18, 2:6] == 2).all()
    assert labels[0, 15, 15] == 1  # the input is not modified
    # it only removes voxels: never a new label
    changed = out != labels
    assert (out[changed] == 0).all()


def test_diagonal_neighbours_are_one_component():
    labels = np.zeros((3, 5, 5), dtype=np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = labels[2, 2, 2] = 1  # 26-connected chain
    labels[0, 4, 4] = 1
    labels[1, 4, 4] = 1
    labels[2, 4, 4] = 1  # a second chain of the same size would tie; make it smaller
    labels[2, 4, 4] = 0
    out = keep_largest_component(labels, 1)
    assert out.sum() == 3 and out[2, 2, 2] == 1


def test_empty_classes_and_none_pass_through():
    labels = np.zeros((2, 4, 4), dtype=np.uint8)
    np.testing.assert_array_equal(keep_largest_component(labels, 3), labels)
    assert postprocess_labels(labels, 3, "none") is labels
    with pytest.raises(ValueError, match="unknown post-processing"):
        postprocess_labels(labels, 3, "median")
    with pytest.raises(ValueError, match="D, H, W"):
        keep_largest_component(labels[0], 3)
