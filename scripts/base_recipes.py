"""The base-head recipes scripts/eval_base.py compares, fitted as make-updatable fits them.

A recipe says which photos the head trains on, how much each weighs, and how long and how
it trains. The fit is make-updatable's (headfit.fit_new_head): the class-mean start, then
the project's numpy trainer (the same steps as ONNX Runtime's: AdamW, learning rate 0.001,
batches of 16, weighted sampling, at most 2048 draws an epoch, seed 0), epochs by
headfit's rule unless the recipe says otherwise.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from healthyluncher import numpy_trainer
from healthyluncher.headfit import MIN_STEPS
from healthyluncher.linearhead import LinearHead
from healthyluncher.settings import Hyperparameters
from healthyluncher.trainers import TrainingSet


@dataclass(frozen=True)
class Recipe:
    lowres: bool = True  # train on the 64 px dishes of lowres64/
    down: bool = False  # and on 64 px copies of the full-size training photos
    # How the photos of a label share its weight (each label weighs the same in all):
    # "photo": in proportion (make-updatable's rule); "res": half to full size, half to
    # 64 px, in proportion within each; "dish": each dish folder the same (a dish's 64 px
    # copies are a folder of their own); "res_dish": half per resolution, each dish folder
    # the same within it.
    weighting: str = "photo"
    epochs: int | None = None  # None: headfit's rule (10 here)
    weight_decay: float = 0.0  # AdamW's decoupled decay (ORT's artifacts use 0)
    weighted_start: bool = False  # class means weighted as the photos are
    learning_rate: float = 0.001


def _settings() -> dict[str, Recipe]:
    out = {"shipped": Recipe(lowres=False), "union": Recipe()}
    for weighting, down, epochs, decay in itertools.product(
        ("photo", "res", "dish", "res_dish"), (False, True), (None, 40), (0.0, 1.0)
    ):
        name = f"{weighting}{'+down' if down else ''}{'-e40' if epochs else ''}"
        name += "-wd1" if decay else ""
        out[name] = Recipe(True, down, weighting, epochs, decay)
    # Stage 2, after stage 1 found longer training worse and the 64 px copies better on
    # unseen dishes: shorter training (0 epochs: the class-mean start alone), stronger
    # decay, a smaller learning rate, and the class means weighted as the photos.
    for weighting in ("photo", "dish", "res_dish"):
        for epochs, decay in itertools.product((0, 2, 5), (0.0, 3.0)):
            if epochs == 0 and decay:
                continue
            name = f"{weighting}+down-e{epochs}" + ("-wd3" if decay else "")
            out[name] = Recipe(True, True, weighting, epochs, decay)
        out[f"{weighting}+down-wd3"] = Recipe(True, True, weighting, None, 3.0)
        out[f"{weighting}+down-wd10"] = Recipe(True, True, weighting, None, 10.0)
        out[f"{weighting}+down-lr3e-4"] = Recipe(True, True, weighting, learning_rate=3e-4)
        out[f"{weighting}+down-wstart"] = Recipe(True, True, weighting, weighted_start=True)
        out[f"{weighting}+down-e0-wstart"] = Recipe(True, True, weighting, 0, weighted_start=True)
    return out


SETTINGS = _settings()


def frozen_setting(name: str) -> Recipe:
    if name.endswith("+wstart"):
        return replace(SETTINGS[name.removesuffix("+wstart")], weighted_start=True)
    return SETTINGS[name]


def weights(recipe: Recipe, y: np.ndarray, dish: np.ndarray, res64: np.ndarray) -> np.ndarray:
    """Sampling weight per photo: each label 1 in all, shared as the recipe says."""
    w = np.zeros(len(y))
    for c in np.unique(y):
        in_label = y == c
        if recipe.weighting == "photo":
            w[in_label] = 1.0 / in_label.sum()
            continue
        levels = [res64] if recipe.weighting in ("res", "res_dish") else []
        folder = np.array([f"{d}|{r}" for d, r in zip(dish, res64, strict=True)])
        if recipe.weighting in ("dish", "res_dish"):
            levels.append(folder)
        _share(w, in_label, levels, 1.0)
    return w


def _share(w: np.ndarray, members: np.ndarray, levels: list[np.ndarray], total: float) -> None:
    """Give `members` `total`, split equally over the first level's values, recursively."""
    if not levels:
        w[members] = total / members.sum()
        return
    values = sorted(set(levels[0][members].tolist()))
    for v in values:
        _share(w, members & (levels[0] == v), levels[1:], total / len(values))


SPEC = LinearHead(op="Gemm", weight="W", bias="b", features=1280, classes=2, trans_b=True)


def class_mean_start(x: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> dict[str, Any]:
    """headfit._class_means: logit_c = x . m_c - |m_c|^2 / 2 in units of the mean norm."""
    flat = x.astype(np.float64)
    scale = float(np.mean(np.linalg.norm(flat, axis=1))) or 1.0
    flat = flat / scale
    means = []
    for c in range(SPEC.classes):
        m = y == c
        means.append(np.average(flat[m], axis=0, weights=None if w is None else w[m]))
    means_arr = np.stack(means)
    return {
        "W": (means_arr / scale).astype(np.float32),
        "b": (-0.5 * np.sum(means_arr * means_arr, axis=1)).astype(np.float32),
    }


def fit(
    recipe: Recipe, data: Any, train: np.ndarray, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The head's (weight (C, D), bias (C,)) trained on the photos of `train` the recipe
    takes."""
    keep = train & (data.kind != "pancakes")
    if not recipe.lowres:
        keep &= data.kind != "low"
    if not recipe.down:
        keep &= data.kind != "down"
    keep &= ~data.copy_held  # make-updatable holds a copy out by its own hash
    x, y, dish = data.x[keep], data.y[keep], data.dish[keep]
    res64 = data.kind[keep] != "full"
    w = weights(recipe, y, dish, res64)
    start = class_mean_start(x, y, w if recipe.weighted_start else None)
    steps_per_epoch = math.ceil(len(y) / 16)
    epochs = recipe.epochs
    if epochs is None:
        epochs = min(200, max(10, math.ceil(MIN_STEPS / steps_per_epoch)))
    if epochs == 0:
        return start["W"], start["b"]
    hp = Hyperparameters(epochs=epochs, seed=seed, learning_rate=recipe.learning_rate)
    saved = numpy_trainer.ADAMW_WEIGHT_DECAY
    numpy_trainer.ADAMW_WEIGHT_DECAY = np.float32(recipe.weight_decay)
    try:
        params, _ = numpy_trainer.train_linear(SPEC, start, TrainingSet(x, y, w), hp)
    finally:
        numpy_trainer.ADAMW_WEIGHT_DECAY = saved
    return params["W"], params["b"]
