"""INT8 rewrites of one exported graph, with onnxruntime.quantization.

What gets quantized: the nodes that carry weights, MatMul / Gemm / Conv
with a constant second input (linear layers, projector, patch embedding,
LM head). They hold nearly all the bytes and FLOPs. Attention's two
activation x activation MatMuls (Q K^T, P V) stay fp32: their inputs have
per-head outliers that one per-tensor scale serves badly, and they hold no
weights to shrink.

    static (int8)          QDQ: QuantizeLinear/DequantizeLinear pairs, standard
                           ONNX domain only (TensorRT builds INT8 engines from
                           them; onnxruntime fuses them into integer kernels).
                           Weights int8 symmetric per output channel;
                           activations int8 symmetric per tensor from the
                           calibrated ranges (zero point 0, as TensorRT needs).
    dynamic (int8-dynamic) MatMulInteger with activations quantized at run time
                           (onnxruntime CPU only).
    embedding              weight-only: a lookup has no compute to speed up, but
                           the table is often the biggest single weight (SmolVLM:
                           49k x 576). Only the gathered rows are converted, so a
                           decode step costs per token, not per table (a
                           DequantizeLinear before the Gather would convert the
                           whole table on every call: 32 ms per token for 49k x
                           576 in onnxruntime, measured):
                             int8          fp16 table: Gather, Cast (TensorRT's
                                           Gather and Cast take no int8, and the
                                           int8 graphs must build there too)
                             int8-dynamic  int8 per row: Gather rows and per-row
                                           scales, Cast, Mul (CPU only anyway)
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np

from vlmedge.errors import MissingDependencyError
from vlmedge.lazy import require

from .ranges import quiet_ort_logging

QUANT_OPS = ("MatMul", "Gemm", "Conv")
STANDARD_DOMAINS = ("", "ai.onnx")


def load_proto(path: Path):
    onnx = require("onnx", "INT8 quantization")
    return onnx.load(str(path), load_external_data=False)


def weight_nodes(model) -> list[str]:
    """Names of MatMul/Gemm/Conv nodes whose second input is a constant of rank >= 2."""
    consts = {i.name: len(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:  # Constant nodes, in case an exporter inlines weights
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = len(a.t.dims)
    return [n.name for n in model.graph.node
            if n.op_type in QUANT_OPS and len(n.input) > 1 and consts.get(n.input[1], 0) >= 2]


def node_labels(model) -> dict[str, str]:
    """Node name -> the PyTorch module it came from (torch.onnx's
    name_scopes metadata), e.g. "language_model.layers.0.mlp.down_proj"."""
    labels = {}
    for n in model.graph.node:
        for p in n.metadata_props:
            if p.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(p.value)
                except (ValueError, SyntaxError):
                    continue
                modules = [s for s in scopes if isinstance(s, str) and s]
                # The last entry is the op itself (linear_7); the one before it the module.
                if len(modules) >= 2 and "." not in modules[-1]:
                    modules = modules[:-1]
                if modules:
                    labels[n.name] = modules[-1]
    return labels


def quantize_static(src: Path, dst: Path, ranges_file: Path, method, nodes: list[str],
                    exclude: list[str]) -> Path:
    """QDQ int8 of `nodes` minus `exclude`, activation ranges from `ranges_file`."""
    q = require("onnxruntime.quantization", "INT8 quantization")
    if "calibration_cache_path" not in inspect.signature(q.quantize_static).parameters:
        raise MissingDependencyError(
            "static INT8 needs an onnxruntime whose quantize_static reads cached ranges "
            "(calibration_cache_path)", hint="pip install -U onnxruntime (1.32 is tested)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet_ort_logging():
        q.quantize_static(
            str(src), str(dst), calibration_data_reader=None,
            calibration_cache_path=str(ranges_file), calibrate_method=method,
            quant_format=q.QuantFormat.QDQ, op_types_to_quantize=list(QUANT_OPS),
            nodes_to_quantize=nodes, nodes_to_exclude=list(exclude), per_channel=True,
            activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
            use_external_data_format=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                           # Q/DQ on the inputs of weighted layers only (TensorRT's
                           # recommended placement): their outputs feed fp32 ops
                           # (norms, rope, attention, the logits), where an int8
                           # round trip costs accuracy and saves nothing.
                           "OpTypesToExcludeOutputQuantization": list(QUANT_OPS),
                           # One Q/DQ pair per consumer (see _keep_pairs_apart).
                           "DedicatedQDQPair": True})
    _keep_pairs_apart(dst)
    return dst


def _keep_pairs_apart(path: Path) -> None:
    """onnxruntime fuses DQ -> MatMul into an integer kernel only where the
    DQ feeds that one MatMul. q/k/v (and gate/up) share their input, so each
    gets its own Q/DQ pair, but onnxruntime's common-subexpression
    elimination merges identical pairs back (same input, same scale) and the
    MatMuls stay fp32 on weights dequantized at every call: a 3.6 ms instead
    of 0.45 ms decode step on the demo model, measured. So the k-th pair of a
    tensor gets its own scale constant, k float32 ulps above the first
    (a relative change of ~1e-7 * k; Q and DQ of a pair keep equal scales)."""
    onnx = require("onnx", "INT8 quantization")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    groups: dict[tuple[str, str], list] = {}
    for n in model.graph.node:  # activation Q nodes by (tensor, scale)
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[1] in inits:
            groups.setdefault((n.input[0], n.input[1]), []).append(n)
    changed = False
    for (_, scale), qs in groups.items():
        value = numpy_helper.to_array(inits[scale]).astype(np.float32)
        for k, q in enumerate(qs[1:], start=1):
            value = np.nextafter(value, np.float32(np.inf), dtype=np.float32)
            name = f"{scale}_pair{k}"
            model.graph.initializer.append(numpy_helper.from_array(value.copy(), name))
            q.input[1] = name
            for d in consumers.get(q.output[0], []):
                if d.op_type == "DequantizeLinear" and d.input[1] == scale:
                    d.input[1] = name
            changed = True
    if changed:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)  # onnx appends to an existing external-data file
        onnx.save_model(model, str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=data.name, size_threshold=1024)


def quantize_dynamic(src: Path, dst: Path, nodes: list[str], exclude: list[str]) -> Path:
    """int8 weights, activations quantized at run time (MatMulInteger)."""
    q = require("onnxruntime.quantization", "INT8 quantization")
    dst.parent.mkdir(parents=True, exist_ok=True)
    # Conv is left out: onnxruntime's ConvInteger has no int8-weight CPU kernel.
    keep = [n for n in nodes if n not in set(exclude)]
    with quiet_ort_logging():
        q.quantize_dynamic(
            str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=keep,
            per_channel=True, weight_type=q.QuantType.QInt8, use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True})
    return dst


def dynamic_nodes(model) -> list[str]:
    """The subset of weight_nodes that quantize_dynamic handles (not Conv)."""
    ops = {n.name: n.op_type for n in model.graph.node}
    return [n for n in weight_nodes(model) if ops[n] != "Conv"]


def quantize_embedding(src: Path, dst: Path, storage: str) -> bool:
    """embed graph Gather(table (V, D) fp32, ids) -> a weight-only table:

    storage "int8" (symmetric per row):
        rows   = Gather(table_int8 (V, D), ids)        # (B, S, D) int8
        scales = Gather(row_scale (V, 1), ids)         # (B, S, 1) fp32
        out    = Cast(rows, float) * scales            # (B, S, D)
    storage "fp16":
        out    = Cast(Gather(table_fp16 (V, D), ids), float)

    Returns False (and writes nothing) for a graph of any other shape."""
    onnx = require("onnx", "INT8 quantization")
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    if len(model.graph.node) != 1 or len(gathers) != 1 or gathers[0].input[0] not in inits:
        return False
    g = gathers[0]
    table = numpy_helper.to_array(inits[g.input[0]]).astype(np.float32)  # (V, D)
    if table.ndim != 2:
        return False
    ids, out = g.input[1], g.output[0]
    f32 = onnx.TensorProto.FLOAT
    if storage == "fp16":
        tensors = [numpy_helper.from_array(table.astype(np.float16), "embed_fp16")]
        nodes = [helper.make_node("Gather", ["embed_fp16", ids], ["rows_fp16"], name="gather_rows",
                                  axis=0),
                 helper.make_node("Cast", ["rows_fp16"], [out], name="cast_rows", to=f32)]
    else:
        scale = np.abs(table).max(axis=1, keepdims=True) / 127.0  # (V, 1)
        scale[scale == 0] = 1.0  # an all-zero row (padding) stays zero
        q = np.clip(np.rint(table / scale), -127, 127).astype(np.int8)
        tensors = [numpy_helper.from_array(q, "embed_int8"),
                   numpy_helper.from_array(scale.astype(np.float32), "embed_row_scale")]
        nodes = [helper.make_node("Gather", ["embed_int8", ids], ["rows_int8"], name="gather_rows",
                                  axis=0),
                 helper.make_node("Gather", ["embed_row_scale", ids], ["row_scales"],
                                  name="gather_scales", axis=0),
                 helper.make_node("Cast", ["rows_int8"], ["rows_float"], name="cast_rows", to=f32),
                 helper.make_node("Mul", ["rows_float", "row_scales"], [out], name="scale_rows")]
    model.graph.ClearField("initializer")
    model.graph.ClearField("node")
    model.graph.ClearField("value_info")
    model.graph.initializer.extend(tensors)
    model.graph.node.extend(nodes)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return True


def non_standard_ops(path: Path) -> list[str]:
    """'domain::op' of every node outside the standard ONNX domain."""
    model = load_proto(path)
    return sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                   if n.domain not in STANDARD_DOMAINS})


def op_counts(path: Path) -> dict[str, int]:
    model = load_proto(path)
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
