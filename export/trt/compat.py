"""Static TensorRT compatibility check of ONNX graphs (`vlm-export check-trt`).

Every node is checked against ops_table: the op is in TensorRT's supported
set, its data inputs have types TensorRT takes, its constrained attributes
have allowed values, inputs that must be initializers are, and Q/DQ zero
points are 0. On top, a data-dependence pass follows which graph inputs'
VALUES reach each tensor (Shape and Size cut the chain: they read shapes
only) and flags every op whose output size would be set by such values
(NonZero; a Reshape or Split whose sizes come from an input's data): those
need data-dependent shapes, which the optimization profiles cannot bound.

No TensorRT needed: this reads the ONNX protobufs (without their external
weight data, except for the few small constants it must see).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlmedge.errors import ArtifactError, UserInputError
from vlmedge.lazy import require

from . import ops_table as T


@dataclass
class Finding:
    component: str
    node: str
    op: str
    # unsupported-op | type | attribute | constant-input | quantization |
    # data-dependent-shape | opset | io-type
    kind: str
    message: str
    severity: str = "error"  # "error" fails the check; "warning" is reported only


@dataclass
class ComponentReport:
    component: str
    file: str
    nodes: int = 0
    op_types: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


@dataclass
class CompatReport:
    components: list[ComponentReport]
    table: str = T.TABLE_SOURCE
    tensorrt_range: str = T.TENSORRT_RANGE

    @property
    def passed(self) -> bool:
        return not any(c.errors for c in self.components)

    def summary(self) -> dict[str, Any]:
        """The manifest's trt.compat entry (and --json output)."""
        return {"passed": self.passed, "table": self.table, "tensorrt_range": self.tensorrt_range,
                "components": {c.component: {"file": c.file, "nodes": c.nodes,
                                             "errors": len(c.errors),
                                             "warnings": len(c.findings) - len(c.errors)}
                               for c in self.components},
                "findings": [asdict(f) for c in self.components for f in c.findings]}


# -- one graph ------------------------------------------------------------------

class _Graph:
    """Types, constants and value sources of one (inferred) ONNX graph."""

    def __init__(self, model, base_dir: Path):
        onnx = require("onnx", "checking ONNX graphs for TensorRT")
        self.onnx = onnx
        self.base_dir = base_dir
        self.shape_inference_error = None
        try:  # types of intermediate tensors; weights stay external (not loaded)
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except (onnx.shape_inference.InferenceError, ValueError) as e:
            self.shape_inference_error = str(e).splitlines()[0][:200]
        self.model, g = model, model.graph
        self.types: dict[str, str] = {}
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type"):
                self.types[v.name] = T.dtype_name(v.type.tensor_type.elem_type)
        self.initializers = {t.name: t for t in g.initializer}
        for name, t in self.initializers.items():
            self.types[name] = T.dtype_name(t.data_type)
        self.constants: dict[str, Any] = {}  # Constant node output -> TensorProto
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = a.t
                        self.types[n.output[0]] = T.dtype_name(a.t.data_type)
        self.graph_inputs = [v.name for v in g.input if v.name not in self.initializers]

    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.constants

    def const_value(self, name: str):
        """numpy value of an initializer/Constant (external data read from base_dir)."""
        from onnx import numpy_helper
        t = self.initializers.get(name) or self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t, base_dir=str(self.base_dir))

    def value_sources(self) -> dict[str, frozenset[str]]:
        """tensor -> graph inputs whose values flow into it (nodes are in
        topological order in a valid ONNX graph)."""
        src: dict[str, frozenset[str]] = {n: frozenset({n}) for n in self.graph_inputs}
        for n in self.model.graph.node:
            if n.op_type in ("Shape", "Size", "Constant", "ConstantOfShape"):
                deps = frozenset()  # reads shapes (or nothing): values are not data
            else:
                deps = frozenset().union(*(src.get(i, frozenset()) for i in n.input if i))
            for o in n.output:
                src[o] = deps
        return src


def _attr(node, name: str, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _check_node(g: _Graph, comp: str, node, out: list[Finding]) -> None:
    op, name = node.op_type, node.name or f"<{node.op_type} -> {node.output[0]}>"

    def add(kind, msg, severity="error"):
        out.append(Finding(comp, name, op, kind, msg, severity))

    if node.domain not in ("", "ai.onnx"):
        add("unsupported-op", f"custom-domain op {node.domain}::{op} needs a TensorRT plugin "
                              f"(onnxruntime contrib ops are not TensorRT ops)")
        return
    if op in T.UNSUPPORTED:
        add("unsupported-op", f"{op} is not supported by TensorRT: {T.UNSUPPORTED[op]}")
        return
    rule = T.SUPPORTED.get(op)
    if rule is None:
        add("unsupported-op", f"{op} is not in TensorRT's ONNX operator list ({T.TABLE_SOURCE})")
        return
    for i in rule.at:
        if i < len(node.input) and node.input[i]:
            t = g.types.get(node.input[i], "?")
            if t == "fp64" and "fp32" in rule.types:
                add("type", f"input {i} ({node.input[i]}) is fp64: TensorRT casts it to fp32, "
                            f"clamping to the fp32 range", "warning")
            elif t != "?" and t not in rule.types:
                add("type", f"input {i} ({node.input[i]}) is {t}; TensorRT's {op} takes "
                            f"{', '.join(sorted(rule.types))}")
    for i in rule.const:
        if i < len(node.input) and node.input[i] and not g.is_const(node.input[i]):
            add("constant-input",
                f"input {i} ({node.input[i]}) must be an initializer: {rule.note}")
    for a, allowed in rule.attrs.items():
        v = _attr(node, a, rule.defaults.get(a))
        if v is not None and v not in allowed:
            add("attribute", f"{a}={v!r} is not supported ({rule.note})")
    _special(g, node, add)


def _special(g: _Graph, node, add) -> None:
    """Constraints that are not a type or attribute set."""
    op = node.op_type
    if op == "Where" and node.input and g.types.get(node.input[0], "bool") not in ("bool", "?"):
        add("type", f"condition {node.input[0]} is {g.types[node.input[0]]}, not bool")
    elif op == "Cast":
        to = T.dtype_name(_attr(node, "to", 1))
        if to not in T.SUPPORTED["Cast"].types:
            add("type", f"cast to {to}: TensorRT casts only to "
                        f"{', '.join(sorted(T.SUPPORTED['Cast'].types))}")
    elif op == "Constant":
        bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string",
                                                            "value_strings")]
        if bad:
            add("attribute", f"Constant with {bad[0]} is not supported")
    elif op in ("QuantizeLinear", "DequantizeLinear"):
        _check_zero_point(g, node, add)
        if op == "DequantizeLinear" and node.input and g.types.get(node.input[0]) == "int4":
            _check_int4_weights(g, node, add)
    elif op == "TopK" and len(node.input) > 1 and g.is_const(node.input[1]):
        k = g.const_value(node.input[1])
        if k is not None and int(k.reshape(-1)[0]) >= 3840:
            add("attribute", f"K={int(k.reshape(-1)[0])}: TensorRT's TopK takes K < 3840")
    elif op == "Dropout" and len(node.input) > 2 and node.input[2]:
        if not g.is_const(node.input[2]) or bool(g.const_value(node.input[2]).reshape(-1)[0]):
            add("constant-input", "training_mode must be a constant false")
    elif op in ("MaxPool", "AveragePool", "LpPool"):
        dil = _attr(node, "dilations")
        if dil and any(d != 1 for d in dil):
            add("attribute", f"dilations={list(dil)}: TensorRT pools without dilation")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            add("attribute", "the Indices output of MaxPool is not supported")
    elif op == "LayerNormalization" and any(o for o in node.output[1:]):
        add("attribute", "only the first output (Y) of LayerNormalization is supported")


def _check_zero_point(g: _Graph, node, add) -> None:
    """TensorRT quantization is symmetric and signed: zero point 0, int8 (or fp8/int4)."""
    if node.op_type == "QuantizeLinear":
        # Without a zero point (or output_dtype) ONNX quantizes to uint8.
        qt = g.types.get(node.output[0], "?")
        if qt not in T.QUANTIZED and qt != "?":
            add("quantization", f"quantizes to {qt}: TensorRT takes int8, fp8 or int4 (give an "
                                f"int8 zero point of 0)")
            return
    zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if zp is None:
        return
    if g.types.get(zp) == "uint8":
        add("quantization", f"zero point {zp} is uint8 (asymmetric): TensorRT needs signed, "
                            f"symmetric quantization (int8, zero point 0)")
        return
    if not g.is_const(zp):
        add("constant-input", f"zero point {zp} must be an initializer")
        return
    value = g.const_value(zp)
    if value is not None and value.size and (value != 0).any():
        add("quantization", f"zero point {zp} is not 0 (max |zp| = {int(abs(value).max())}): "
                            f"TensorRT quantization is symmetric")


def _check_int4_weights(g: _Graph, node, add) -> None:
    """TensorRT takes INT4 for weights only, with per-block scales: blocks of
    64 or 128 along one of the last two axes."""
    x, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
    if x not in g.initializers:
        add("quantization", f"int4 input {x} is not an initializer: TensorRT takes INT4 for "
                            f"weights only")
        return
    dims = list(g.initializers[x].dims)
    scale_t = g.initializers.get(scale)
    if scale_t is None:
        add("constant-input", f"int4 scales {scale} must be an initializer")
        return
    if scale_t.data_type == 1:  # FLOAT: the weights dequantize to fp32 for an fp32 MatMul
        add("type", f"int4 weight {x} dequantizes to fp32: TensorRT's weight-only INT4 is for "
                    f"fp16/bf16 activations (vlm-export --precision int4-fp16)", "warning")
    sizes = " or ".join(map(str, T.INT4_BLOCK_SIZES))
    if len(scale_t.dims) != len(dims):
        add("quantization", f"int4 weight {x} has per-tensor or per-axis scales: TensorRT's "
                            f"INT4 takes per-block scales (blocks of {sizes})")
        return
    block = _attr(node, "block_size", 0)
    axis = _attr(node, "axis", 1)
    axis = axis + len(dims) if axis < 0 else axis
    if block not in T.INT4_BLOCK_SIZES:
        add("quantization", f"int4 blocks of {block}: TensorRT's INT4 takes blocks of {sizes} "
                            f"(vlm-export --weight-block-size)")
    if axis < len(dims) - 2:
        add("quantization", f"int4 blocks along axis {axis} of a rank-{len(dims)} weight: "
                            f"TensorRT blocks one of the last two axes")


def _subgraph_nodes(node):
    """Nodes of If/Loop/Scan bodies (checked for support only: their tensor
    types are not inferred here)."""
    for a in node.attribute:
        graphs = [a.g] if a.HasField("g") else list(a.graphs)
        for sub in graphs:
            for n in sub.node:
                yield n
                yield from _subgraph_nodes(n)


def check_model(model, component: str, file: str, base_dir: Path) -> ComponentReport:
    """Every node of one ONNX model against TensorRT's table."""
    onnx = require("onnx", "checking ONNX graphs for TensorRT")
    if model.functions:  # model-local functions: check what they expand to
        model = onnx.inliner.inline_local_functions(model)
    g = _Graph(model, base_dir)
    rep = ComponentReport(component, file, nodes=len(model.graph.node),
                          op_types=sorted({n.op_type for n in model.graph.node}))
    out = rep.findings
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = T.OPSET_RANGE
    later_lo, later_hi = T.LATER_OPSET_RANGE
    if opset is not None and later_lo <= opset <= later_hi:
        out.append(Finding(component, "<model>", "", "opset",
                           f"default-domain opset {opset}: TensorRT 10.0-10.1 document opsets "
                           f"{lo}-{hi}, 10.15 documents up to {later_hi} ({T.LATER_OPSET_SOURCE}; "
                           f"releases between unchecked): build the engines with a TensorRT "
                           f"whose operators.md takes opset {opset}", "warning"))
    elif opset is not None and not lo <= opset <= hi:
        out.append(Finding(component, "<model>", "", "opset",
                           f"default-domain opset {opset}; TensorRT 10.0+ parses opsets {lo}-{hi}"))
    if g.shape_inference_error:
        out.append(Finding(component, "<model>", "", "type",
                           f"ONNX shape inference failed ({g.shape_inference_error}); intermediate "
                           f"types were not checked", "warning"))
    for v in list(model.graph.input) + list(model.graph.output):
        t = g.types.get(v.name, "?")
        if v.name not in g.initializers and t != "?" and t not in T.IO_TYPES:
            out.append(Finding(component, v.name, "", "io-type",
                               f"graph {'input' if v in model.graph.input else 'output'} "
                               f"{v.name} is {t}; TensorRT network I/O takes "
                               f"{', '.join(sorted(T.IO_TYPES))}"))
    for node in model.graph.node:
        _check_node(g, component, node, out)
        for sub in _subgraph_nodes(node):
            _check_node(g, component, sub, out)
    _check_data_dependent(g, component, out)
    return rep


def _check_data_dependent(g: _Graph, comp: str, out: list[Finding]) -> None:
    src = g.value_sources()
    for node in g.model.graph.node:
        name = node.name or f"<{node.op_type} -> {node.output[0]}>"
        if node.op_type in T.DATA_DEPENDENT_OUTPUT:
            out.append(Finding(comp, name, node.op_type, "data-dependent-shape",
                               f"its output size is {T.DATA_DEPENDENT_OUTPUT[node.op_type]}, known "
                               f"only at run time; the optimization profile cannot bound it"))
            continue
        for i in T.SHAPE_VALUE_INPUTS.get(node.op_type, ()):
            if i < len(node.input) and node.input[i]:
                inputs = sorted(src.get(node.input[i], ()))
                if inputs:
                    out.append(Finding(
                        comp, name, node.op_type, "data-dependent-shape",
                        f"input {i} ({node.input[i]}) sets an output size from the values of graph "
                        f"input(s) {', '.join(inputs)}: TensorRT would need them as shape-tensor "
                        f"inputs (value ranges in every profile) or data-dependent shapes; derive "
                        f"the size from input shapes or constants instead"))
                    break


# -- artifacts, files and the report ----------------------------------------------

def _targets(path: Path) -> list[tuple[str, Path]]:
    """(component, onnx file) pairs for an artifact dir, a dir of .onnx files or one file."""
    if path.is_file():
        if path.suffix != ".onnx":
            raise UserInputError(f"{path} is not an .onnx file or an artifact directory")
        return [(path.stem, path)]
    if not path.is_dir():
        raise ArtifactError(f"{path} does not exist",
                            expected="an artifact directory or .onnx file")
    if (path / "manifest.json").exists():
        from vlmedge import containment, manifest
        m = manifest.load(path, verify=False)  # strict parse; names checked inside the artifact
        # every graph and its external data checked as the runtime checks them
        return [(name, containment.checked_graph(path, c.file, f"components.{name}.file", m.files,
                                                 allowed={c.data_file} if c.data_file else set()))
                for name, c in m.components.items()]
    files = sorted(path.glob("*.onnx"))
    if not files:
        raise ArtifactError(f"{path} has no manifest.json and no .onnx files",
                            expected="an artifact directory written by vlm-export")
    return [(f.stem, f) for f in files]


def check_path(path: Path | str) -> CompatReport:
    """Checks an artifact directory (its manifest's components), a directory
    of .onnx files or one .onnx file."""
    return check_files(_targets(Path(path)))


def check_files(targets: list[tuple[str, Path]]) -> CompatReport:
    """Checks (component, .onnx file) pairs."""
    onnx = require("onnx", "checking ONNX graphs for TensorRT")
    from google.protobuf.message import DecodeError

    reports = []
    for comp, f in targets:
        if not f.is_file():
            raise ArtifactError(f"component {comp}: {f.name} is missing from {f.parent}",
                                hint="copy the whole artifact directory, or re-export")
        try:
            model = onnx.load(str(f), load_external_data=False)
        except (DecodeError, OSError, ValueError) as e:
            raise ArtifactError(f"cannot read {f} as ONNX ({e})") from None
        reports.append(check_model(model, comp, f.name, f.parent))
    return CompatReport(reports)


def format_report(rep: CompatReport) -> list[str]:
    """Human-readable lines: one per component, then one per finding."""
    lines = [f"TensorRT compatibility ({rep.tensorrt_range}; table: {rep.table})"]
    for c in rep.components:
        warn = len(c.findings) - len(c.errors)
        status = "ok" if not c.errors else f"{len(c.errors)} problem(s)"
        lines.append(f"  {c.file}: {c.nodes} nodes, {len(c.op_types)} op types: {status}"
                     + (f", {warn} warning(s)" if warn else ""))
        for f in c.findings:
            lines.append(f"    {f.severity}: {f.node} ({f.op or '-'}) [{f.kind}]: {f.message}")
    lines.append("passed" if rep.passed
                 else "FAILED: TensorRT cannot build these graphs as they are")
    return lines
