"""make-updatable --examples: how the photos of a label share its weight."""

import numpy as np

from healthyluncher.headfit import example_weights


def test_each_label_weighs_the_same() -> None:
    labels = np.array([0, 0, 0, 1])
    groups = np.array(["a", "a", "b", ""], dtype=object)
    w = example_weights(labels, groups, by_subfolder=False)
    assert np.allclose(w, [1 / 3, 1 / 3, 1 / 3, 1.0])


def test_each_subfolder_weighs_the_same_within_its_label() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    groups = np.array(["a", "a", "b", "c", ""], dtype=object)
    w = example_weights(labels, groups, by_subfolder=True)
    assert np.allclose(w, [0.25, 0.25, 0.5, 0.5, 0.5])
    assert np.isclose(w[labels == 0].sum(), w[labels == 1].sum())
