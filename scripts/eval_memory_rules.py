"""Rules for the nearest-neighbour memory's floor, side by side.

Run from the repository root (needs ../shared/food and the two leave-out bases of
scripts/eval_heads.py):

    .venv/bin/python scripts/eval_memory_rules.py --tuning-base /tmp/lobaseB \\
        --report-base /tmp/lobase --out results/memory-rules.md

The memory adds `strength` x (similarity - floor) to a class's logit when a photo's head
input is close to one of the user's examples of that class. The rules differ in the floor:

- `photo` (heads.add_memory until this comparison): the threshold, or the photo's own
  similarity to the nearest replayed base example of another label, if higher. A photo
  moves only when it is nearer to the user's example than to anything the base knows
  under another label.
- `radius` (heads.add_memory until centring was adopted; memory.build_memory without a
  centre, threshold 0.4): the threshold, or the user's
  example's similarity to its nearest replayed base example of another label, if higher:
  each example claims a ball whose radius is set by its own nearest conflicting base
  example. The floor is per example and known at retrain time, so `predict` no longer
  compares photos with the replay set.
- `both`: the higher of the two floors (a photo must pass both).
- `kth-N`: `radius` with the ball bounded by the example's N-th nearest replayed row of
  another label instead of its nearest (N counts rows: the replay set holds each base
  photo twice, full size and as a 64 px thumbnail); `kth-1` is `radius`.
- `centred-T`: `radius` on head inputs centred on the mean of the base's replay set
  (SimpleShot's centring: the pooled features are all positive, so raw cosines crowd
  together), with threshold T in place of 0.4 (centred cosines are lower). `centred-0.1`
  is heads.add_memory now (memory.build_memory with copy_memory's centre and the
  `memory_floor` setting 0.1), chosen on the tuning pair of
  results/memory-rules-centred.md.
- `centred-tukey-P-T`: `centred-T` on Tukey-transformed head inputs: every head input x
  (the photo, the user's rows, the replay set, so the centre and the floors too) becomes
  max(x, 0)^P (the pooled features are non-negative; results/heads-dc.md found x^0.5 to
  help ridge heads at K>=5), the centre the mean of the transformed replay set, then the
  same centred cosine, floors and bonus with threshold T (results/memory-rules-tukey.md).
- `imagenet-S` (or `imagenet-S-T`, threshold T, 0.4 if not given): `radius` in the
  output space of the stock ImageNet classifier instead of its 1280-d input: every head
  input f (the photo, the user's rows, the replay set, so the floors too) becomes z = W f
  + b through the stock model's last layer (`--imagenet`, its final Gemm or MatMul), then
  S: `logit` z; `logprob` log-softmax(z) centred per row (the log-sum-exp cancels, so
  z - mean(z)); `prob` softmax(z); `hellinger` sqrt(softmax(z)) (cosine = the Bhattacharyya
  coefficient). All are a Gemm and a few elementwise ops in front of the memory's graph.
- `embed-S`: `radius` (threshold 0.4) in another embedding of the same frozen network,
  for the memory only (the head still reads its 1280-d input): S one of
  scripts/eval_memory_embeddings.py's spaces (e.g. `cat320-192-112`: the L2-normalised
  average pools of the last feature map and of the 320-, 192- and 112-channel stage
  outputs, concatenated). Every bank row (replay rows, photos, the user's views) is
  embedded again through the base's ONNX model with those maps as extra outputs, from
  the library's own pixels (imaging.load, imaging.augmented_views with the embedder's
  seed), and checked against the bank's head inputs; a case's memory rows are found
  among its draw's view rows by their head inputs.
- `local-S` (or `local-S-T`, threshold T, 0.4 if not given): `radius` with a
  local-descriptor similarity in place of the cosine, for the memory only: S one of
  scripts/eval_memory_local.py's DN4 spaces
  (`dn4-M-kK`, `dn4-M-k1-sym`, which may be written `dn4-M-sym`; e.g. `dn4-S7-sym`: the
  mean over a photo's 49 positions of the best cosine to the example's 49 positions of
  the 320-channel S7 map, averaged over both directions). The bank's maps are made as for
  `embed-S` (the same pixels and checks); the similarities of every draw's view rows to
  the replay rows and the scored photos are computed once per pair, and the library's
  floors (the highest similarity to a replay row of another class, at least T) and
  bonus (memory_bonus's arithmetic) are applied to them.
- `centred-flipq-T` and `centred-flip-T`: test-time flip averaging, then `centred-T`. A
  flip-averaged head input is the mean of the head inputs of the pixels the model reads
  and of the same tensor flipped along its width axis (ImageOps.mirror after
  imaging.resize_and_crop, where augmented_views mirrors its views), run through the
  library's embedder (Embedder._run_frozen) from the library's pixels, as `embed-S` makes
  them (the unflipped half is checked against the bank). `flipq` (query only): the photo
  being predicted (held-out, base and far photos) is flip-averaged, for the retrained
  head's logits and the memory alike; the user's memory rows and the replay set (so the
  centre and the floors) stay as they are. `flip` (everywhere): the memory rows (each a
  view of a user's photo, flip-averaged from that view's pixels) and the replay set (its
  full-size rows from their photos, its thumbnails from the same photos at 64 px) too,
  so the centre and the floors are on flip-averaged inputs. The head itself is retrained
  as shipped (its training views already include random mirrors); only what it reads
  at prediction time changes. The base head's accuracy on flip-averaged base and far
  photos is reported beside (base drop stays against the unflipped base head)
  (results/memory-rules-flip.md).

`--rules` runs some of them (results/memory-rules-centred.md: radius and centred-T;
any `kth-N`, `centred-T`, `centred-tukey-P-T`, `centred-flipq-T`, `centred-flip-T`,
`imagenet-S[-T]`, `embed-S` or `local-S` may be named).
`--pairs tuning` runs the tuning pair alone (to fix a choice before the report pair is
looked at).

Protocol: eval_heads.py's pairs, scenarios and draws (its `setup_pair`: the same photos,
draws and augmented views).

- Default: no retrain; the rules sit on the base head, so the comparison is of the rules
  alone. Relabelled dishes only (K = 1, 5, 10; a new label has no base logit to add to).
  Deterministic: one run per draw.
- `--retrained`: the shipped design with each rule. Each draw is retrained through the
  public API (`healthyluncher.open(dir).retrain`, as eval_dishes.py does) with each of
  `--seeds` training seeds; the retrained head's logits (memory off) plus each rule's
  memory over the copy's own memory rows (examples.memory_rows) decide. A new label
  from 10 photos is scored too. At strength 40 (the default), `photo` was the shipped
  design and `radius` is.

`strength` is chosen per rule on the tuning pair: the highest mean recall over the
scenarios among the strengths whose mean base drop is at most 0.5 point and whose mean
far drop is at most 1.0 point above the rule's at the weakest strength (the retrained head
moves far photos by itself), in every scenario. The report pair is measured at that
strength, and at the default strength (40) for every rule. Means over draws, seeds and
dishes, the worst run in brackets.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import eval_heads as heads_eval  # type: ignore[import-not-found]  # noqa: E402
import eval_memory_embeddings as embeddings  # type: ignore[import-not-found]  # noqa: E402
import eval_memory_local as local_eval  # type: ignore[import-not-found]  # noqa: E402
from eval_dishes import report_dishes  # type: ignore[import-not-found]  # noqa: E402
from eval_personalization import ours  # type: ignore[import-not-found]  # noqa: E402

from healthyluncher.examples import load_replay, memory_rows  # noqa: E402
from healthyluncher.heads import head_with  # noqa: E402
from healthyluncher.memory import (  # noqa: E402
    EXACT_MATCH,
    _best_per_class,
    _mask,
    _unit,
    build_memory,
    memory_bonus,
)
from healthyluncher.personal import personal_graphs  # noqa: E402
from healthyluncher.records import load_examples, load_personal, load_weights  # noqa: E402
from healthyluncher.runtime import HeadRunner  # noqa: E402
from healthyluncher.store import Files  # noqa: E402

STRENGTHS = (10, 20, 40, 80, 160, 320, 640)
RULES = ("photo", "radius", "both", "centred-0.2", "centred-0.4")
THRESHOLD = 0.4  # the plain-cosine memory_threshold shipped before centring
SHIPPED = 40.0  # Hyperparameters().memory_strength
MAX_BASE_DROP, MAX_FAR_RISE = 0.5, 1.0


IMAGENET = Path("/tmp/backbones/lite0-imagenet.onnx")
SPACES = ("logit", "logprob", "prob", "hellinger")


@functools.cache
def imagenet_layer(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The stock classifier's last layer: W (1280, 1000) as x @ W takes it, b (1000,)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    last = model.graph.node[-1]
    if last.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in last.attribute}
        assert attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        assert not attrs.get("transA", 0)
        w = values[last.input[1]]
        w = w.T if attrs.get("transB", 0) else w
        return w.astype(np.float32), values[last.input[2]].astype(np.float32)
    if last.op_type == "Add":  # MatMul, then Add of the bias
        matmul = next(n for n in model.graph.node if n.output[0] in last.input)
        assert matmul.op_type == "MatMul"
        w = values[matmul.input[1]]
        bias = next(values[i] for i in last.input if i in values)
        return w.astype(np.float32), bias.astype(np.float32)
    raise SystemExit(f"{path}: its last node is {last.op_type}, not Gemm or MatMul + Add")


def imagenet_rule(rule: str) -> tuple[str, float]:
    """`imagenet-S[-T]`: the space S and the threshold T."""
    parts = rule.split("-")
    if len(parts) not in (2, 3) or parts[1] not in SPACES:
        raise SystemExit(f"--rules {rule}: imagenet-S[-T] with S one of {', '.join(SPACES)}")
    return parts[1], float(parts[2]) if len(parts) == 3 else THRESHOLD


def project(x: np.ndarray, space: str, path: Path) -> np.ndarray:
    """Head inputs (N, ...) in the stock classifier's output space S (see the docstring)."""
    w, b = imagenet_layer(path)
    z = x.reshape(len(x), -1).astype(np.float32) @ w + b
    if space == "logit":
        return z
    z -= z.mean(axis=1, keepdims=True)
    if space == "logprob":
        return z
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p if space == "prob" else np.sqrt(p)


def tukey_rule(rule: str) -> tuple[float, float]:
    """`centred-tukey-P-T`: the power P and the threshold T."""
    parts = rule.removeprefix("centred-tukey-").split("-")
    try:
        power, threshold = (float(v) for v in parts)
    except ValueError:
        raise SystemExit(f"--rules {rule}: centred-tukey-P-T, P a power, T a threshold") from None
    if power <= 0:
        raise SystemExit(f"--rules {rule}: the power must be positive")
    return power, threshold


def tukey(x: np.ndarray, power: float) -> np.ndarray:
    """Head inputs (N, ...) as max(x, 0)^P, flattened (N, D)."""
    flat = np.maximum(x.reshape(len(x), -1).astype(np.float32), 0)
    return np.power(flat, np.float32(power))  # type: ignore[no-any-return]


def flip_rule(rule: str) -> tuple[bool, float]:
    """`centred-flipq-T` / `centred-flip-T`: whether everything is flip-averaged (not
    only the query), and the threshold T."""
    kind, _, tail = rule.removeprefix("centred-").partition("-")
    try:
        threshold = float(tail)
    except ValueError:
        threshold = float("nan")
    if kind not in ("flip", "flipq") or not np.isfinite(threshold):
        raise SystemExit(f"--rules {rule}: centred-flipq-T or centred-flip-T, T a threshold")
    return kind == "flip", threshold


def is_flip(rule: str) -> bool:
    return rule.startswith(("centred-flip-", "centred-flipq-"))


def unit(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1).astype(np.float32)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


def bonus(
    rule: str,
    x: np.ndarray,
    rows: np.ndarray,
    classes: np.ndarray,
    num_classes: int,
    strength: float,
    replay: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """A rule's addition to the logits of x: (N, num_classes). `radius` is the library's
    memory (memory.build_memory, memory_bonus); `photo` its rule before (kept here);
    `both` the stricter of the two floors; `centred-T` the library's rule on head inputs
    centred on the replay set's mean (SimpleShot's centring), with threshold T; `kth-N`
    the library's rule with each row's N-th highest similarity to the replay rows of
    other classes in place of the highest; `imagenet-S[-T]` the library's rule with
    threshold T on x, rows and replay already projected (run_rule)."""
    if rule.startswith("embed-"):
        memory = build_memory(rows, classes, THRESHOLD, replay)
        return memory_bonus(x, memory, num_classes, strength)
    if rule.startswith("imagenet-"):
        memory = build_memory(rows, classes, imagenet_rule(rule)[1], replay)
        return memory_bonus(x, memory, num_classes, strength)
    if rule == "radius" or rule.startswith("kth-"):
        memory = build_memory(rows, classes, THRESHOLD, replay)
        if rule.startswith("kth-"):
            similarity = memory.unit @ _unit(replay[0]).T  # (M, R), as build_memory
            similarity[classes[:, None] == replay[1][None, :]] = -1.0
            nth = np.sort(similarity, axis=1)[:, -int(rule.split("-")[1])]
            memory = dataclasses.replace(memory, floors=np.maximum(nth, np.float32(THRESHOLD)))
        return memory_bonus(x, memory, num_classes, strength)
    if rule.startswith("centred-tukey-"):
        power, threshold = tukey_rule(rule)
        flat = tukey(replay[0], power)
        mean = flat.mean(axis=0)
        memory = build_memory(
            tukey(rows, power) - mean, classes, threshold, (flat - mean, replay[1])
        )
        return memory_bonus(tukey(x, power) - mean, memory, num_classes, strength)
    if rule.startswith("centred-"):
        flat = replay[0].reshape(len(replay[0]), -1).astype(np.float32)
        mean = flat.mean(axis=0)
        centred = (flat - mean, replay[1])
        memory = build_memory(rows.reshape(len(rows), -1) - mean, classes,
                              float(rule.split("-")[1]), centred)  # fmt: skip
        return memory_bonus(x.reshape(len(x), -1) - mean, memory, num_classes, strength)
    ux, ur, r = unit(x), unit(rows), unit(replay[0])
    near = ux @ r.T  # (N, R): the photo's similarity to each replayed example
    similarity = ux @ ur.T  # (N, M)
    floors = build_memory(rows, classes, THRESHOLD, replay).floors
    out = np.zeros((len(x), num_classes), np.float32)
    for c in np.unique(classes):
        photo_floor = np.maximum(near[:, replay[1] != c].max(axis=1), THRESHOLD)
        best = similarity[:, classes == c].max(axis=1)
        above = best - photo_floor
        if rule == "both":
            above = np.minimum(above, (similarity[:, classes == c] - floors[classes == c]).max(1))
        exact = np.maximum(best - EXACT_MATCH, 0) / (1 - EXACT_MATCH)
        out[:, c] = (np.maximum(above, 0) + exact) * strength
    return out


def base_cases(pair: Any, flip: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One case per relabelling draw: the base head's logits (and on the flip-averaged
    bank `flip`, if given), the user's views as rows."""
    assert pair.base is not None
    runner = HeadRunner(head_with(pair.base.path / Files.HEAD, None))
    logits = runner.logits(pair.bank)
    flipped = None if flip is None else runner.logits(flip)
    cases = []
    for d in pair.draws:
        if d["new"]:
            continue
        label_id = pair.labels.index(d["label"])
        rows = pair.bank[d["view_rows"]]
        cases.append(
            {"d": d, "seed": 0, "label_id": label_id, "logits": logits, "rows": rows,
             "classes": np.full(len(rows), label_id), "n": len(pair.labels),
             "logits_flip": flipped}
        )  # fmt: skip
    return cases


def retrained_cases(pair: Any, seeds: int, flip: np.ndarray | None = None) -> list[dict[str, Any]]:
    """One case per draw and seed: the library's retrain, its head's logits without the
    memory (and on the flip-averaged bank `flip`, if given), and the copy's memory rows."""
    assert pair.base is not None
    wanted = np.unique(np.concatenate([pair.base_rows, pair.far_rows]))
    cases = []
    for d in pair.draws:
        for seed in range(seeds):
            store = pair.seeded[seed]
            ours(store, d["label"], d["photos"], None)
            state = store.read_state()
            personal = load_personal(store, state)
            assert personal is not None
            meta = personal.meta
            examples = load_examples(personal, ())
            plain = meta.hyperparameters.replace(memory_strength=0.0)
            _, head = personal_graphs(pair.base, meta.labels, load_weights(personal), examples,
                                      plain, with_model=False)  # fmt: skip
            rows = np.unique(np.concatenate([wanted, d["held_rows"]]))
            logits = np.zeros((len(pair.bank), len(meta.labels)), np.float32)
            runner = HeadRunner(head_with(head, None))
            logits[rows] = runner.logits(pair.bank[rows])
            flipped = None
            if flip is not None:
                flipped = np.zeros_like(logits)
                flipped[rows] = runner.logits(flip[rows])
            memory, classes, _ = memory_rows(examples, meta.labels)
            cases.append(
                {"d": d, "seed": seed, "label_id": meta.labels.index(d["label"]),
                 "logits": logits, "rows": memory, "classes": classes,
                 "n": len(meta.labels), "logits_flip": flipped}
            )  # fmt: skip
    return cases


PROJECTED: dict[tuple[str, str], np.ndarray] = {}  # (pair, space): the pair's bank in it


def projected_bank(pair: Any, space: str, path: Path) -> np.ndarray:
    if (pair.name, space) not in PROJECTED:
        PROJECTED[pair.name, space] = project(pair.bank, space, path)
    return PROJECTED[pair.name, space]


EMBEDDED: dict[str, dict[str, np.ndarray]] = {}  # pair: its bank's pooled maps


def embedded_bank(pair: Any, name: str) -> np.ndarray:
    """The pair's bank in space `name` (eval_memory_embeddings.space), row for row."""
    if pair.name not in EMBEDDED:
        EMBEDDED[pair.name] = pooled_bank(pair)
    return embeddings.space(EMBEDDED[pair.name], name)  # type: ignore[no-any-return]


def pooled_bank(pair: Any, fn: Any = embeddings.pooled, sess: Any = None) -> dict[str, np.ndarray]:
    """The pooled maps (or what `fn(sess, batch)` keeps, with `avg`) of every bank row,
    from the library's pixels, checked against the bank's head inputs (the `avg` pool is
    the head input). `sess`: the base's ONNX model with the maps as outputs if None."""
    from healthyluncher import imaging
    from healthyluncher.photos import digest_of, read_bytes
    from healthyluncher.records import BUNDLED_MODEL

    t = time.perf_counter()
    prep = pair.base.meta.preprocessing
    if sess is None:
        sess = embeddings.session(pair.base_dir / BUNDLED_MODEL)
    n = len(pair.bank)
    out: dict[str, np.ndarray] = {}

    def put(at: np.ndarray, got: dict[str, np.ndarray]) -> None:
        for k, v in got.items():
            out.setdefault(k, np.full((n, *v.shape[1:]), np.nan, v.dtype))[at] = v

    paths = sorted(pair.index, key=pair.index.get)
    rows = np.array([pair.index[p] for p in paths])
    put(rows, embeddings.embed(sess, [Path(p) for p in paths], prep, None, fn))
    # The replay set: its full-size rows are photos of the bank; its thumbnails again.
    half = len(pair.replay_rows) // 2
    cos = unit(pair.bank[:half]) @ unit(pair.bank[rows]).T
    assert cos.max(axis=1).min() >= 0.9999, "replay rows that are no photo of the bank"
    match = rows[cos.argmax(axis=1)]
    put(np.arange(half), {k: v[match] for k, v in out.items()})
    photo_of = {r: p for p, r in pair.index.items()}
    small = [Path(photo_of[int(r)]) for r in match]
    put(np.arange(half, 2 * half), embeddings.embed(sess, small, prep, embeddings.SMALL, fn))
    # The drawn photos' augmented views, as the embedder makes them.
    done: set[int] = set()
    for d in pair.draws:
        views = len(d["view_rows"]) // len(d["photos"])
        for j, photo in enumerate(d["photos"]):
            start = int(d["view_rows"][j * views])
            if start in done:
                continue
            done.add(start)
            data = read_bytes(photo)
            image = imaging.decode(data, prep, name=str(photo))
            seed = int(digest_of(data)[:8], 16)
            pixels = imaging.augmented_views(image, prep, views, seed)
            put(np.arange(start, start + views), fn(sess, pixels))
    assert not np.isnan(out["avg"]).any(), "bank rows left without an embedding"
    worst = float(np.min(np.sum(unit(out["avg"]) * unit(pair.bank), axis=1)))
    diff = float(np.abs(out["avg"] - pair.bank.reshape(n, -1)).max())
    print(f"[{pair.name}] {n} bank rows embedded again in {time.perf_counter() - t:.0f} s: "
          f"avg against the head inputs, lowest cosine {worst:.6f}, max |diff| {diff:.1e}",
          flush=True)  # fmt: skip
    if worst < 0.9999:
        raise SystemExit(f"[{pair.name}] the pooled maps do not match the head inputs")
    return out


FLIPPED: dict[str, np.ndarray] = {}  # pair: its bank, flip-averaged


def flipped_bank(pair: Any) -> np.ndarray:
    """Every bank row flip-averaged: the mean of the head inputs of its pixels and of
    them flipped along the width axis, through the library's embedder (its frozen part);
    pooled_bank makes the pixels and checks the unflipped half against the bank."""
    if pair.name not in FLIPPED:
        from healthyluncher.embedder import Embedder

        assert pair.base is not None
        embedder = Embedder(pair.seeded[0], pair.base, 1)
        width = -1 if pair.base.meta.preprocessing.layout == "NCHW" else -2

        def both(sess: Any, batch: np.ndarray) -> dict[str, np.ndarray]:
            plain = sess._run_frozen(batch).reshape(len(batch), -1)
            mirror = sess._run_frozen(np.ascontiguousarray(np.flip(batch, axis=width)))
            return {"avg": plain, "flip": (plain + mirror.reshape(len(batch), -1)) / 2}

        flip = pooled_bank(pair, both, embedder)["flip"].astype(np.float32)
        cos = np.sum(unit(flip) * unit(pair.bank), axis=1)
        print(f"[{pair.name}] flip-averaged bank: cosine to the unflipped rows mean "
              f"{cos.mean():.4f}, lowest {cos.min():.4f}", flush=True)  # fmt: skip
        FLIPPED[pair.name] = flip
    return FLIPPED[pair.name]


def flip_base(pair: Any, flip: np.ndarray) -> dict[str, dict[str, float]]:
    """The base head's accuracy on the base's held-out photos and the far photos, as they
    are and flip-averaged (and how often the unflipped calls agree with pair.base_pred)."""
    assert pair.base is not None
    runner = HeadRunner(head_with(pair.base.path / Files.HEAD, None))
    out = {}
    for what, rows, truth in (("base", pair.base_rows, pair.base_truth),
                              ("far", pair.far_rows, pair.far_truth)):  # fmt: skip
        plain = runner.logits(pair.bank[rows]).argmax(axis=1)
        flipped = runner.logits(flip[rows]).argmax(axis=1)
        out[what] = {
            "accuracy": float(np.mean(plain == truth)),
            "accuracy_flip": float(np.mean(flipped == truth)),
            "changed": float(np.mean(plain != flipped)),
            "agrees_with_base_pred": float(np.mean(plain == pair.base_pred[rows])),
        }
    print(f"[{pair.name}] base head, flip-averaged: {out}", flush=True)
    return out


def memory_bank_rows(pair: Any, case: dict[str, Any]) -> np.ndarray:
    """The bank rows of a case's memory rows: among its draw's view rows, by head input."""
    candidates = case["d"]["view_rows"]
    cos = unit(case["rows"]) @ unit(pair.bank[candidates]).T
    if cos.max(axis=1).min() < 0.9999:
        raise SystemExit("a memory row is none of its draw's views")
    return candidates[cos.argmax(axis=1)]  # type: ignore[no-any-return]


def local_rule(rule: str) -> tuple[tuple[str, int, bool], float]:
    """`local-S[-T]`: step A's (map, k, symmetric) of space S (`dn4-M-sym` =
    `dn4-M-k1-sym`) and the threshold T."""
    spaces = dict(local_eval.LOCAL)
    spaces |= {n.replace("-k1-sym", "-sym"): v for n, v in local_eval.LOCAL.items() if v[2]}
    name, threshold = rule.removeprefix("local-"), THRESHOLD
    head, _, tail = name.rpartition("-")
    if head in spaces and tail.replace(".", "", 1).isdigit():
        name, threshold = head, float(tail)
    if name not in spaces:
        raise SystemExit(f"--rules {rule}: local-S[-T] with S one of {', '.join(spaces)}")
    return spaces[name], threshold


LOCAL_MAPS: dict[tuple[str, str], dict[str, np.ndarray]] = {}  # (pair, map): its bank's
LOCAL_SIMS: dict[tuple[str, tuple[str, int, bool]], tuple[np.ndarray, np.ndarray]] = {}


def local_similarity(pair: Any, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """(the view rows of every draw, sorted; s(x, q) for every bank row x and those rows
    q, NaN where x is neither a replay row nor a photo any case scores)."""
    space = local_rule(rule)[0]
    if (pair.name, space) in LOCAL_SIMS:
        return LOCAL_SIMS[pair.name, space]
    m, k, sym = space
    if (pair.name, m) not in LOCAL_MAPS:

        def maps(sess: Any, batch: np.ndarray) -> dict[str, np.ndarray]:
            got = local_eval.local(sess, batch)
            return {"avg": got["avg"], m: got[m]}

        LOCAL_MAPS[pair.name, m] = pooled_bank(pair, maps)
    desc = LOCAL_MAPS[pair.name, m][m]
    t = time.perf_counter()
    qs = np.unique(np.concatenate([d["view_rows"] for d in pair.draws]))
    xs = np.unique(np.concatenate([pair.replay_rows, pair.base_rows, pair.far_rows,
                                   *[d["held_rows"] for d in pair.draws]]))  # fmt: skip
    sim = np.full((len(pair.bank), len(qs)), np.nan, np.float32)
    for a in range(0, len(qs), 128):  # q blocks bound dn4's (q, 49, chunk, 49) products
        got = local_eval.dn4(desc[qs[a : a + 128]], desc[xs])
        s = got[f"xq{k}"]
        if sym:
            s = (s + got[f"qx{k}"]) / 2
        sim[xs, a : a + len(s)] = s.T
    print(f"[{pair.name}] {rule}: {len(xs)} photos x {len(qs)} views in "
          f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
    LOCAL_SIMS[pair.name, space] = qs, sim
    return qs, sim


def local_bonus(
    similarity: np.ndarray, classes: np.ndarray, floors: np.ndarray, n: int, strength: float
) -> np.ndarray:
    """memory_bonus's arithmetic on precomputed similarities (N, M) to the memory rows."""
    mask = _mask(classes, n)
    above = _best_per_class(similarity - floors[None, :], mask)
    best = _best_per_class(similarity, mask)
    exact = np.maximum(best - np.float32(EXACT_MATCH), 0) * np.float32(1 / (1 - EXACT_MATCH))
    return (np.maximum(above, 0) + exact) * np.float32(strength)  # type: ignore[no-any-return]


def run_local(
    pair: Any, rule: str, strength: float, cases: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`local-S`: the retrained head's logits plus the library's memory rule on step A's
    local-descriptor similarity (floors against the replay rows of another class)."""
    qs, sim = local_similarity(pair, rule)
    threshold = np.float32(local_rule(rule)[1])
    runs = []
    for case in cases:
        classes = case["classes"]
        cols = np.searchsorted(qs, memory_bank_rows(pair, case))
        to_replay = sim[pair.replay_rows][:, cols]  # (R, M)
        to_replay[pair.replay_y[:, None] == classes[None, :]] = -1.0
        floors = np.maximum(to_replay.max(axis=0), threshold)
        CLAMPED.setdefault((pair.name, rule), []).append(float(np.mean(floors == threshold)))

        def predict(
            which: np.ndarray,
            case: dict[str, Any] = case,
            cols: np.ndarray = cols,
            floors: np.ndarray = floors,
        ) -> np.ndarray:
            s = sim[which][:, cols]
            assert not np.isnan(s).any(), "a scored photo without local similarities"
            added = local_bonus(s, case["classes"], floors, case["n"], strength)
            return (case["logits"][which] + added).argmax(axis=1)  # type: ignore[no-any-return]

        runs.append(measured(pair, case, predict))
    return runs


def measured(pair: Any, case: dict[str, Any], predict: Any) -> dict[str, Any]:
    """One case's run: its dish, K, draw and seed, and heads_eval's measures of `predict`."""
    d = case["d"]
    m = heads_eval.measure(
        pair, d, predict(d["held_rows"]), predict(pair.base_rows), predict(pair.far_rows),
        case["label_id"],
    )  # fmt: skip
    return {"dish": d["dish"], "k": 0 if d["new"] else d["k"], "draw": d["draw"],
            "seed": case["seed"], **m}  # fmt: skip


CLAMPED: dict[tuple[str, str], list[float]] = {}  # share of a case's floors at the threshold


def run_rule(
    pair: Any, rule: str, strength: float, cases: list[dict[str, Any]], imagenet: Path
) -> list[dict[str, Any]]:
    if rule.startswith("local-"):
        return run_local(pair, rule, strength, cases)
    replay = load_replay(pair.base)
    assert replay is not None
    bank = pair.bank
    space = imagenet_rule(rule)[0] if rule.startswith("imagenet-") else None
    if space is not None:
        bank = projected_bank(pair, space, imagenet)
        replay = (project(replay[0], space, imagenet), replay[1], replay[2])
    embedded = rule.removeprefix("embed-") if rule.startswith("embed-") else None
    if embedded is not None:
        bank = embedded_bank(pair, embedded)
        replay = (bank[pair.replay_rows], replay[1], replay[2])
    inner, logits_key, everywhere = rule, "logits", False  # the rule `bonus` runs
    if is_flip(rule):
        everywhere, threshold = flip_rule(rule)
        inner, logits_key, bank = f"centred-{threshold:g}", "logits_flip", flipped_bank(pair)
        if everywhere:
            replay = (bank[pair.replay_rows], replay[1], replay[2])
    runs = []
    for case in cases:
        rows = case["rows"] if space is None else project(case["rows"], space, imagenet)
        if embedded is not None or everywhere:
            rows = bank[memory_bank_rows(pair, case)]
        if rule == "radius":  # how often the threshold is the floor (against local-S)
            floors = build_memory(rows, case["classes"], THRESHOLD, replay).floors
            CLAMPED.setdefault((pair.name, rule), []).append(float(np.mean(floors == THRESHOLD)))
        if inner.startswith("centred-"):  # the same, on centred (and transformed) inputs
            power, threshold = tukey_rule(inner) if "tukey" in inner else (1.0, float(inner[8:]))
            flat = tukey(replay[0], power)
            mean = flat.mean(axis=0)
            memory = build_memory(tukey(rows, power) - mean, case["classes"], threshold,
                                  (flat - mean, replay[1]))  # fmt: skip
            share = float(np.mean(memory.floors == np.float32(threshold)))
            CLAMPED.setdefault((pair.name, rule), []).append(share)

        def predict(
            which: np.ndarray, case: dict[str, Any] = case, rows: np.ndarray = rows
        ) -> np.ndarray:
            x, classes, n = bank[which], case["classes"], case["n"]
            added = bonus(inner, x, rows, classes, n, strength, replay)
            return (case[logits_key][which] + added).argmax(axis=1)  # type: ignore[no-any-return]

        runs.append(measured(pair, case, predict))
    return runs


def summary(runs: list[dict[str, Any]]) -> dict[int, dict[str, list[float]]]:
    """Per K: [mean, worst] of each measure (worst: the lowest recall and precision, the
    highest drops)."""
    out: dict[int, dict[str, list[float]]] = {}
    for k in sorted({r["k"] for r in runs}):
        cell = [r for r in runs if r["k"] == k]
        out[k] = {}
        for measure, worst in (("recall", min), ("precision", min), ("base_drop", max),
                               ("far_drop", max)):  # fmt: skip
            values = [r[measure] for r in cell]
            out[k][measure] = [float(np.mean(values)), float(worst(values))]
    return out


def allowed(
    s: dict[int, dict[str, list[float]]], weakest: dict[int, dict[str, list[float]]]
) -> bool:
    return all(
        c["base_drop"][0] <= MAX_BASE_DROP
        and c["far_drop"][0] <= weakest[k]["far_drop"][0] + MAX_FAR_RISE
        for k, c in s.items()
    )


def mean_recall(s: dict[int, dict[str, list[float]]]) -> float:
    return float(np.mean([c["recall"][0] for c in s.values()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    heads_eval.add_pair_arguments(parser, "eval-memory-rules")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "memory-rules.md")
    parser.add_argument(
        "--retrained", action="store_true", help="the shipped retrain under each rule"
    )
    parser.add_argument("--seeds", type=int, default=3, help="training seeds (--retrained)")
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rules")
    parser.add_argument(
        "--pairs", default="tuning,report", help="'tuning' alone: fix a choice before the report"
    )
    parser.add_argument(
        "--imagenet",
        type=Path,
        default=IMAGENET,
        help="the stock Lite0 model with its logits (imagenet-S rules; scripts/export_lite.py)",
    )
    args = parser.parse_args()
    if "tuning" not in args.pairs.split(","):
        raise SystemExit("--pairs: the tuning pair chooses each rule's strength; name it")
    if not args.retrained:
        args.seeds = 1
    args.skip_current = not args.retrained  # setup_pair: one store per seed when retraining
    started = time.perf_counter()
    far = report_dishes(args.food)
    results: dict[str, Any] = {}
    for pair in heads_eval.pairs_of(args):
        name = pair.name
        if name not in args.pairs.split(","):
            continue
        heads_eval.setup_pair(pair, args, far)
        flip = None
        if any(is_flip(rule) for rule in args.rules.split(",")):
            flip = flipped_bank(pair)
            results.setdefault("flip_base", {})[name] = flip_base(pair, flip)
        t = time.perf_counter()
        cases = (retrained_cases(pair, args.seeds, flip) if args.retrained
                 else base_cases(pair, flip))  # fmt: skip
        print(f"[{name}] {len(cases)} cases in {time.perf_counter() - t:.0f} s", flush=True)
        for rule in args.rules.split(","):
            if name == "tuning":
                curve = {
                    s: summary(run_rule(pair, rule, s, cases, args.imagenet)) for s in STRENGTHS
                }
                weakest = curve[STRENGTHS[0]]
                fine = [s for s in STRENGTHS if allowed(curve[s], weakest)] or [STRENGTHS[0]]
                chosen = max(fine, key=lambda s: mean_recall(curve[s]))
                results[rule] = {"tuning_curve": curve, "strength": chosen, "allowed": fine}
            chosen = results[rule]["strength"]
            results[rule][name] = summary(run_rule(pair, rule, chosen, cases, args.imagenet))
            results[rule][f"{name}@{SHIPPED:g}"] = summary(
                run_rule(pair, rule, SHIPPED, cases, args.imagenet)
            )
            print(f"[{name}] {rule} strength {chosen}", flush=True)
    for (pair_name, rule), shares in CLAMPED.items():
        results[rule][f"{pair_name}_floors_at_threshold"] = float(np.mean(shares))
    results["seconds"] = time.perf_counter() - started
    write(args, results)


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    def cell(c: dict[str, list[float]]) -> str:
        return " | ".join(
            f"{c[m][0]:{f}} ({c[m][1]:{f}})"
            for m, f in (
                ("recall", ".2f"),
                ("precision", ".2f"),
                ("base_drop", "+.2f"),
                ("far_drop", "+.2f"),
            )  # fmt: skip
        )

    lines = [
        "# The memory's floor: from the photo's nearest conflicting base example, the user "
        "example's, or both",
        "",
        f"Produced by `python scripts/eval_memory_rules.py --food {args.food} "
        f"--tuning-base {args.tuning_base} --report-base {args.report_base}"
        f" --work {args.work} --cache {args.cache}"
        + (f" --retrained --seeds {args.seeds}" if args.retrained else "")
        + (f" --rules {args.rules}" if args.rules != ",".join(RULES) else "")
        + (f" --pairs {args.pairs}" if args.pairs != "tuning,report" else "")
        + (
            f" --imagenet {args.imagenet}"
            if any(r.startswith("imagenet-") for r in args.rules.split(","))
            else ""
        )
        + f" --out {args.out}` in {results['seconds']:.0f} s; the protocol is in the "
        "script's docstring ("
        + (
            "the shipped retrain, then each rule"
            if args.retrained
            else "memory rules on the base head alone, no retrain"
        )
        + ").",
        "",
        "Tuning pair (" + args.tuning_dishes + "), mean recall over K and the largest mean "
        "drops, per strength:",
        "",
        "| rule | strength | mean recall | max base drop (pt) | max far drop (pt) | allowed |",
        "|---|---:|---:|---:|---:|---|",
    ]
    rules = args.rules.split(",")
    for rule in rules:
        for s, c in results[rule]["tuning_curve"].items():
            lines.append(
                f"| {rule} | {s} | {mean_recall(c):.3f} | "
                f"{max(x['base_drop'][0] for x in c.values()):+.2f} | "
                f"{max(x['far_drop'][0] for x in c.values()):+.2f} | "
                f"{'yes' if s in results[rule]['allowed'] else 'no'} |"
            )
    lines += [
        "",
        "At the default strength, then at the strength each rule chose on the tuning pair. "
        "Mean (worst run); scenario K=0 is a new label from 10 photos:",
        "",
        "| pair | rule | strength | scenario | recall | precision | base drop (pt) | far drop "
        "(pt) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in args.pairs.split(","):
        for key, what in ((f"{pair}@{SHIPPED:g}", "default"), (pair, "chosen")):
            for rule in rules:
                strength = SHIPPED if what == "default" else results[rule]["strength"]
                for k, c in results[rule][key].items():
                    scenario = "new label" if k == 0 else f"K={k}"
                    lines.append(
                        f"| {pair} | {rule} | {strength:g} ({what}) | {scenario} | {cell(c)} |"
                    )
    for pair, got in results.get("flip_base", {}).items():
        lines += ["", f"Base head alone ({pair} pair's base), as shipped and flip-averaged: "
                  + "; ".join(f"{what} photos accuracy {v['accuracy']:.4f} -> "
                              f"{v['accuracy_flip']:.4f} ({v['changed']:.2%} of calls change)"
                              for what, v in got.items()) + "."]  # fmt: skip
    at = "_floors_at_threshold"
    clamped = [f"{rule} {key.split('_')[0]} {v:.2f}" for rule in rules
               for key, v in results[rule].items() if key.endswith(at)]  # fmt: skip
    if clamped:
        lines += ["", "Share of memory rows whose floor is the threshold (no replay row of "
                  "another class above it; mean over cases and strengths): "
                  + ", ".join(clamped) + "."]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
