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


def rename_dims(model, spec: GraphSpec) -> None:
    """Set dim_param of graph inputs/outputs to the contract's names; fixed
    dims keep their values."""
    for values, dims in ((model.graph.input, spec.input_dims), (model.graph.output, spec.output_dims)):
        for vi in values:
            for ax, dim_name in dims.get(vi.name, {}).items():
                d = vi.type.tensor_type.shape.dim[ax]
                d.ClearField("dim_value")
                d.dim_param = dim_name


def export_graph(spec: GraphSpec, path: Path, verbose: bool = False) -> Path:
    """Exports `spec` to `path` (+ `path.name + '.data'`). Returns path."""
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
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
    model = program.model_proto
    rename_dims(model, spec)
    data_name = path.name + ".data"
    # Tensors under 1 KiB (shape constants feeding Reshape, scalars) stay inline:
    # onnxruntime's shape inference must read them; weights go to external data.
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024, convert_attribute=False)
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
