"""torch module -> ONNX file with standard names, named dynamic dims and
external weight data.

torch.onnx.export(dynamo=True, opset 18) with every dynamic axis declared
Dim.DYNAMIC: the exporter works out relations itself (total = past + seq)
and names dims after its symbols (s53, s17 + s40), which are then renamed to
the contract's names (batch, sequence_length, ...). Weights always go to
external data (`<file>.data`), so >2 GiB models take the same path.
"""
from __future__ import annotations

import io
import logging
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from vlmedge.lazy import require

from .families.base import GraphSpec


def _dynamic_shapes(spec: GraphSpec, Dim):
    shapes = []
    names = iter(spec.input_names)
    for arg in spec.args:
        if isinstance(arg, (list, tuple)):
            shapes.append([{ax: Dim.DYNAMIC for ax in spec.input_dims.get(next(names), {})}
                           for _ in arg])
        else:
            shapes.append({ax: Dim.DYNAMIC for ax in spec.input_dims.get(next(names), {})})
    return tuple(shapes)


def rename_dims(model, spec: GraphSpec, ir) -> None:
    """Set the graph inputs'/outputs' dynamic dims of `model` (an onnx_ir
    Model) to the contract's names; fixed dims keep their values."""
    for values, dims in ((model.graph.inputs, spec.input_dims),
                         (model.graph.outputs, spec.output_dims)):
        for value in values:
            names = dims.get(value.name, {})
            if names and value.shape is not None:
                shape = list(value.shape)
                for ax, dim_name in names.items():
                    shape[ax] = ir.SymbolicDim(dim_name)
                value.shape = ir.Shape(shape)


def export_graph(spec: GraphSpec, path: Path, verbose: bool = False) -> Path:
    """Exports `spec` to `path` (+ `path.name + '.data'`). Returns path."""
    torch = require("torch", "ONNX export")
    ir = require("onnx_ir", "ONNX export")
    spec.module.eval()
    # The exporter prints progress banners and warnings about ops it handles
    # fine; keep the user's terminal to our own progress lines.
    sink = io.StringIO()
    quiet = logging.getLogger("torch.onnx")  # e.g. "torchvision is not installed. Skipping ..."
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        program = _export(torch, spec, sink, verbose)
    finally:
        quiet.setLevel(level)
    # Save from the exporter's in-memory IR, whose initializers still point at
    # the torch weights: they are streamed to the .data file. Going through
    # program.model_proto first built a protobuf copy of every weight (peak
    # memory ~2x the weights; a 2.2 B-parameter model did not fit in 24 GB).
    rename_dims(program.model, spec, ir)
    # Tensors under 1 KiB (shape constants feeding Reshape, scalars) stay inline:
    # onnxruntime's shape inference must read them; weights go to external data.
    ir.save(program.model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
    return path


def _export(torch, spec: GraphSpec, sink, verbose: bool):
    with torch.no_grad(), warnings.catch_warnings(), redirect_stdout(sink), \
            (redirect_stderr(sink) if not verbose else io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module, spec.args, dynamo=True, opset_version=18,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec, torch.export.Dim), optimize=True,
            verbose=False)
    return program
