"""Where a classifier can be cut for training: the tensors that cross a cut, the ops that
cannot train, and the cuts that work (rewrites.py simplifies the model before).

Graph analysis on onnx protos: `graph.split` asks it before cutting (after one run of the
model, `folded_cuts`, for the cut tensors whose first axis is not the batch),
`trainers.generate_artifacts` after ONNX Runtime refused a head.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from healthyluncher.decompose import blocker
from healthyluncher.errors import Message, Param

# `trainable_layers` values checked when a refusal lists the ones that work.
MAX_LISTED = 10
TRAINABLE_LAYERS = Param("trainable_layers")
# Ops whose outputs carry no gradient back to their inputs (shapes, comparisons): an op
# past them is not on the way from a trained weight to the loss.
NO_GRADIENT_FLOW = frozenset(
    {"Shape", "Size", "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not",
     "And", "Or", "Xor", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero"}
)  # fmt: skip


class LayerLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def data_input(self) -> str: ...

    @property
    def trainable_names(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Topology:
    """What a cut needs to know of a graph, computed once for every cut tried."""

    model: onnx.ModelProto
    image: str
    producers: dict[str, int]  # tensor -> index of the node that writes it
    data: frozenset[str]  # tensors that depend on the image
    used: frozenset[str]  # tensors read by a node or a graph output
    folded: frozenset[str] = frozenset()  # cut tensors whose first axis is not the batch

    @staticmethod
    def of(model: onnx.ModelProto, image: str, cuts: Iterable[str] = ()) -> Topology:
        """`cuts`: the tensors to check for one row per photo (running the model once)."""
        nodes = model.graph.node
        producers = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        data = {image}
        for node in nodes:  # nodes are in topological order
            if any(name in data for name in node.input):
                data.update(node.output)
        used = {name for node in nodes for name in node.input} | {
            o.name for o in model.graph.output
        }
        folded = folded_cuts(model, image, [c for c in cuts if c in data and c != image])
        return Topology(model, image, producers, frozenset(data), frozenset(used), folded)

    def before(self, cut: str) -> set[str]:
        """The image-dependent tensors that computing `cut` needs (the frozen part's)."""
        found: set[str] = set()
        stack = [cut]
        while stack:
            name = stack.pop()
            if name in found or name not in self.data:
                continue
            found.add(name)
            if name in self.producers:
                stack.extend(self.model.graph.node[self.producers[name]].input)
        return found

    def head(self, cut: str, logits: str) -> tuple[list[int], list[str]]:
        """(the nodes between `cut` and `logits`, in graph order; the frozen part's
        tensors besides `cut` that they read, first reader first)."""
        frozen = self.before(cut)
        nodes: set[int] = set()
        crossing: set[str] = set()
        seen: set[str] = set()
        stack = [logits]
        while stack:
            name = stack.pop()
            if name == cut or name in seen or not name:
                continue
            seen.add(name)
            if name in frozen or (name in self.data and name not in self.producers):
                crossing.add(name)
            elif name in self.producers:
                nodes.add(self.producers[name])
                stack.extend(self.model.graph.node[self.producers[name]].input)
        order = sorted(nodes)
        readers = [n for i in order for n in self.model.graph.node[i].input if n in crossing]
        return order, list(dict.fromkeys(readers))


def cut_problem(topology: Topology, layers: Sequence[LayerLike], n: int, logits: str) -> str | None:
    """Why training the last `n` layers does not work ("--trainable-layers n ..."), or None."""
    trainable = layers[-n:]
    cut = trainable[0].data_input
    if not cut:
        return f"finds no data input for layer {trainable[0].name!r}"
    if cut in topology.folded:
        return (
            f"cannot cut the model at {cut!r}: its first axis is not one row per photo (an op "
            "before it folds the batch into another axis: a Reshape, Flatten or Transpose)"
        )
    nodes, crossing = topology.head(cut, logits)
    if crossing:
        more = f" (and {len(crossing) - 1} more)" if len(crossing) > 1 else ""
        what = (
            f"the model's input {crossing[0]!r}{more}"
            if crossing[0] == topology.image
            else f"{crossing[0]!r}{more}, computed before the cut (a skip connection or "
            "another branch around it)"
        )
        return (
            f"cannot cut the model at one tensor: the trainable part would start at {cut!r} "
            f"but also read {what}"
        )
    graph = topology.model.graph
    params = {name for layer in trainable for name in layer.trainable_names}
    read = {name for i in nodes for name in graph.node[i].input}
    for layer in trainable:
        if not set(layer.trainable_names) <= read:
            return f"would leave layer {layer.name!r} out of the trainable part"
    for i in _on_gradient_path(graph, nodes, params):
        reason = blocker(graph.node[i], topology.used)
        if reason is not None:
            node = graph.node[i]
            named = f" ({node.name!r})" if node.name else ""
            return f"puts the op {node.op_type}{named} in the trainable part, which {reason}"
    return None


def folded_cuts(model: onnx.ModelProto, image: str, cuts: Sequence[str]) -> frozenset[str]:
    """The tensors among `cuts` whose first axis is not one row per photo: a Reshape to
    (-1, channels) of (batch, tokens, channels), say, caches tokens, not photos. Found by
    running the model on a batch of one photo and one of two (or of its fixed batch size)
    and comparing; nothing when the model does not run here (it is checked later)."""
    from healthyluncher.runtime import inference_session

    if not cuts:
        return frozenset()
    value = next(v for v in model.graph.input if v.name == image)
    dims = [d.dim_value or None for d in value.type.tensor_type.shape.dim]
    side = 224  # a dynamic height or width (the channels are known: graph._image_input)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in cuts)
    rng = np.random.default_rng(0)
    folded: set[str] = set()
    try:
        session = inference_session(probe.SerializeToString(), threads=1)
        for batch in [dims[0]] if dims[0] else [1, 2]:
            sample = rng.uniform(-1, 1, [batch] + [d or side for d in dims[1:]]).astype(dtype)
            shapes = [np.shape(out) for out in session.run(None, {image: sample})]
            folded.update(n for n, s in zip(cuts, shapes, strict=True) if s[:1] != (batch,))
    except Exception:  # noqa: BLE001 - what fails here, check_run says after the cut
        return frozenset()
    return frozenset(folded)


def _on_gradient_path(graph: onnx.GraphProto, nodes: list[int], params: set[str]) -> list[int]:
    """The nodes among `nodes` (in graph order) whose output depends on a trained weight."""
    reached = set(params)
    found = []
    for i in nodes:
        node = graph.node[i]
        if any(name in reached for name in node.input):
            found.append(i)
            if node.op_type not in NO_GRADIENT_FLOW:
                reached.update(node.output)
    return found


def working_counts(
    topology: Topology, layers: Sequence[LayerLike], logits: str, limit: int = MAX_LISTED
) -> list[int]:
    """The `--trainable-layers` values from 1 to `limit` that cut this model cleanly."""
    top = min(len(layers), limit)
    return [n for n in range(1, top + 1) if cut_problem(topology, layers, n, logits) is None]


def choices(counts: Sequence[int], total: int, limit: int = MAX_LISTED) -> Message:
    """The end of a refusal: which `trainable_layers` values work instead."""
    checked = f" (1 to {limit} checked)" if total > limit else ""
    if not counts:
        return "no ", TRAINABLE_LAYERS, f" value works for this model{checked}"
    return "choose ", TRAINABLE_LAYERS, f" from {', '.join(map(str, counts))}{checked}"
