"""ONNX Runtime's training files for a head: the training, eval and optimizer models and
the checkpoint, as onnxruntime.training.artifacts.generate_artifacts writes them for a
cross-entropy loss and AdamW or SGD, then one training step to prove them.

The generator is ONNX Runtime's own (its onnxblock building blocks, onnxruntime-training
1.19.2 being the last release), with one difference: its graph builders are given a log
level. generate_artifacts gives them none, and then they write their INFO lines to the
process's stderr (fd 2) whatever the program set, which the library hid by redirecting
fd 2 for everyone (the program's other threads lost their stderr meanwhile).

What remains of the program's state here: onnxblock logs through the root logger with
logging.debug, which configures a root logger that has no handler (logging.basicConfig).
`trainers.generate_artifacts` runs this in a child Python then (`child_job`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from healthyluncher import heldlocks
from healthyluncher.runtime import MAX_IR_VERSION, onnxblock, session_options, training_api

FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
# onnxblock builds on module globals (the model being built): one generator at a time.
_ONE_AT_A_TIME = heldlocks.module_lock(globals(), "_ONE_AT_A_TIME")


def write(
    model: onnx.ModelProto, trainable: Sequence[str], optimizer: str, directory: Path
) -> None:
    """Write the training files for `model` (a head, rewritten for training) into
    `directory`, then take one step with them; raises what ONNX Runtime raises."""
    with _ONE_AT_A_TIME:
        _generate(model, trainable, optimizer, directory)
    _lower_ir_versions(directory)
    _run_one_step(directory, model)


def child_job(args: dict[str, Any], data: bytes) -> None:
    """`write`, in a child process (child.run): the model comes as bytes."""
    write(
        onnx.load_from_string(data), args["trainable"], args["optimizer"], Path(args["directory"])
    )


def _generate(
    model: onnx.ModelProto, trainable: Sequence[str], optimizer: str, directory: Path
) -> None:
    """generate_artifacts(model, requires_grad=trainable, frozen_params=[],
    loss=CrossEntropyLoss, optimizer=AdamW or SGD, artifact_directory=directory), step for
    step, with the graph builders' log fatal-only."""
    ob, graph_utils, training_graph, accessor = onnxblock()
    options = session_options(threads=1)

    class Training(ob.TrainingBlock):  # type: ignore[misc, name-defined]
        """generate_artifacts' training block; `__call__` is TrainingBlock's, except that
        the gradient graph is built with `options`."""

        def __init__(self) -> None:
            super().__init__()
            self._loss = ob.loss.CrossEntropyLoss()

        def build(self, *inputs: str) -> Any:
            return self._loss(*inputs)

        def __call__(self, *args: str) -> Any:
            self.base = accessor._GLOBAL_ACCESSOR.model
            output = self.build(*args)
            model = self.infer_shapes_on_base()
            graph_utils.register_graph_outputs(model, output)
            self._parameters = training_graph.get_model_parameters(
                model, self._requires_grad, self._frozen_params
            )
            self._training_model, self._eval_model = _gradient_graph(
                training_graph, model, self._requires_grad, self._frozen_params, output, options
            )
            training_graph.build_gradient_accumulation_graph(
                self._training_model, self._requires_grad
            )
            accessor._GLOBAL_ACCESSOR.model.CopyFrom(self._training_model)
            return output

    block = Training()
    for name in trainable:
        block.requires_grad(name)
    with ob.base(model):
        block(*[output.name for output in model.graph.output])
        training_model, eval_model = block.to_model_proto()
        parameters = block.parameters()
    onnx.save(training_model, str(directory / "training_model.onnx"))
    onnx.save(eval_model, str(directory / "eval_model.onnx"))
    ob.save_checkpoint(parameters, str(directory / "checkpoint"), nominal_checkpoint=False)
    opset = next(d.version for d in model.opset_import if d.domain in ("", "ai.onnx"))
    step = {"adamw": ob.optim.AdamW, "sgd": ob.optim.SGD}[optimizer]()
    with ob.empty_base(opset_version=opset):
        step(parameters)
        optimizer_model = step.to_model_proto()
    onnx.save(optimizer_model, str(directory / "optimizer_model.onnx"))


def _gradient_graph(
    training_graph: Any,
    model: onnx.ModelProto,
    requires_grad: set[str],
    frozen: set[str],
    outputs: str | list[str],
    options: Any,
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """onnxblock's build_gradient_graph, with `options` (their log level) given to the
    graph optimizer and the gradient builder instead of default SessionOptions."""
    from onnxruntime.capi._pybind_state import GradientGraphBuilder, get_optimized_model

    names = [outputs] if isinstance(outputs, str) else list(outputs)
    training_graph._move_initializers_to_inputs(model, requires_grad | frozen)
    eval_model = copy.deepcopy(model)
    training_graph._disable_training_mode(eval_model)
    optimized = onnx.load_from_string(
        get_optimized_model(model.SerializeToString(), requires_grad, options)
    )
    builder = GradientGraphBuilder(
        optimized.SerializeToString(), {names[0]}, requires_grad, names[0], options
    )
    builder.build()
    gradient_model = onnx.load_from_string(builder.get_model())
    training_graph._reorder_outputs(gradient_model, names, requires_grad)
    return gradient_model, eval_model


def _lower_ir_versions(directory: Path) -> None:
    """onnx >= 1.18 writes the optimizer model with an IR version ORT 1.19 refuses."""
    for name in FILES:
        path = directory / name
        model = onnx.load(str(path))
        if model.ir_version > MAX_IR_VERSION:
            model.ir_version = MAX_IR_VERSION
            onnx.save(model, str(path))


def _run_one_step(directory: Path, model: onnx.ModelProto) -> None:
    """Create the training session and take one step (forward and backward) on zeros,
    without the optimizer: ONNX Runtime writes gradients it has no CPU kernel for (Resize,
    ConvTranspose), which only the session finds."""
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    options = session_options(threads=1)
    module = api.Module(str(directory / "training_model.onnx"), state, session_options=options)
    weights = {t.name for t in model.graph.initializer}
    value = next(i for i in model.graph.input if i.name not in weights)
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in value.type.tensor_type.shape.dim]
    if 0 in dims[1:]:
        return  # a symbolic size: the session alone is checked
    dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    module.train()
    module(np.zeros([1, *dims[1:]], dtype), np.zeros(1, np.int64))
