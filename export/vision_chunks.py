"""The ort-flavour vision tower's MLPs run in pieces of the patch sequence, so
that its widest activation is never whole in memory.

A ViT MLP is fc1 (B, S, D) -> (B, S, 4D), an activation, fc2 (B, S, 4D) ->
(B, S, D). Every row (patch) goes through it alone, so cutting the sequence
into pieces and running the MLP on each gives the same rows, and only one
piece's (B, S/k, 4D) activation (and the activation's output beside it) is
alive at a time. On SmolVLM-256M's int8 tower at 512 px (1,024 patches, 3,072
wide) fc1's output and the GELU's are 12 MB each: the tower's peak RSS over
its weights was 60 MB whole and 39 MB in pieces of 256 rows, at the same speed
(306-314 against 309-319 ms, 2 threads) and with bit-identical features.

The rewrite, per MLP found (`_mlps`):

    x (B, S, D) -> Split (axis 1, S = s1 + ... + sk) -> the MLP's nodes, copied
    for each piece -> Concat (axis 1) -> y (B, S, D)

where the MLP is: [DequantizeLinear] -> fc1 (MatMul | MatMulIntegerToFloat)
-> the activation: elementwise ops reading only fc1's output, each other and
constants the same for every row (its bias Add; FastGelu; GELU written out
with Erf or Tanh; CLIP's quick_gelu x * Sigmoid(a * x)) -> [QuantizeLinear]
-> [DequantizeLinear] -> fc2 -> [Add bias], each tensor read inside the MLP
alone, every other input a constant. A projector of the same form is one
more MLP. Only a graph whose sequence lengths are fixed (the SigLIP/CLIP
towers at their one input size) is cut: each MLP's S is read from one run of
the graph. The cut graph must give the original's features (within
vision_fusion's bounds) on a random input, else it is not written.

Only the ort flavour's graph (onnxruntime runs it; its allocation plan frees
each piece's tensors after their last reader) is cut; the portable graph is
left for TensorRT, which plans its own memory.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Callable

from vlmedge.lazy import require

from . import vision_fusion

PIECE_ROWS = 256  # patches per piece: 256 x 3,072 fp32 = 3 MB, GEMMs still full-speed
PROJECTIONS = ("MatMul", "MatMulIntegerToFloat")
# ops applied to each value alone (a row constant broadcast): the activation
# between fc1 and fc2 is made of these
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Erf", "Tanh", "Sigmoid", "Exp",
               "Neg", "Abs", "Relu", "Clip", "FastGelu", "Gelu", "QuickGelu", "BiasGelu",
               "Cast"}
INT64 = 7  # onnx.TensorProto.INT64


def chunk_mlps(path: Path, log: Callable[[str], None], quantized: bool = False,
               rows: int | None = None) -> bool:
    """Cuts each MLP of the graph at `path` (its weights in a data file beside
    it, which is left as it is) into pieces of at most `rows` patches, in
    place, if the cut graph agrees with the original; returns whether it was
    rewritten. quantized: a QDQ/int8 graph (held to vision_fusion's integer
    bound, as it changes no integer). rows: PIECE_ROWS unless given."""
    rows = rows or PIECE_ROWS
    onnx = require("onnx", "cutting the vision MLPs")
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # Split takes its sizes as an input from opset 13
        log(f"[vision-pieces] {path.name} kept whole: opset {opset} (13 or later cuts)")
        return False
    nodes = list(graph.node)  # one wrapper per node: _cut's replacements are keyed by id()
    mlps = _mlps(nodes, *_constants(graph), {o.name for o in graph.output})
    if not mlps:
        log(f"[vision-pieces] {path.name} kept whole: no MLP (fc1, activation, fc2) found")
        return False
    lengths, why = _sequence_lengths(path, model, [t for m in mlps for t in (m.entry, m.exit)])
    if lengths is None:
        log(f"[vision-pieces] {path.name} kept whole: {why}")
        return False
    # (B, S, D) in and out, as many rows out as in
    sequences = [(m, lengths[m.entry]) for m in mlps
                 if lengths[m.entry] is not None and lengths[m.exit] == lengths[m.entry]]
    long = [(m, length) for m, length in sequences if length > rows]
    if not long:
        log(f"[vision-pieces] {path.name} kept whole: " + (
            f"{max(length for _, length in sequences)} patches, within {rows}" if sequences
            else "no MLP takes and gives (batch, sequence, width)"))
        return False
    replace, groups = {}, {}
    prefix = _fresh_prefix(nodes, graph)
    for i, (mlp, length) in enumerate(long):
        sizes = _piece_sizes(length, rows)
        replace.update(_cut(onnx.helper, mlp, sizes, f"{prefix}_{i}"))
        groups[length] = groups.get(length, 0) + 1
    cut = [made for n in nodes for made in replace.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(cut)
    agrees = vision_fusion.Agreement(quantized, exact=quantized)
    held = [model]
    del model, graph
    vision_fusion.save_beside(onnx, held, path, path, agrees)
    if agrees.figures is None:
        log(f"[vision-pieces] {path.name} kept whole: the cut graph could not be loaded or run")
        return False
    if not agrees.ok:
        log(f"[vision-pieces] {path.name} kept whole: the cut graph's features differ "
            f"({_said(agrees)})")
        return False
    said = "; ".join(f"{count} in {len(_piece_sizes(length, rows))} pieces of "
                     f"<= {max(_piece_sizes(length, rows))} of their {length} rows"
                     for length, count in groups.items())
    log(f"[vision-pieces] the MLPs of {path.name} run in pieces: {said} (features "
        f"{_said(agrees)})")
    return True


def _fresh_prefix(nodes: list, graph) -> str:
    """A name prefix no node or tensor of the graph starts with (a graph cut
    before, too), for the nodes and tensors the cut makes."""
    taken = {n.name for n in nodes} | {t for n in nodes for t in (*n.input, *n.output)} | \
        {i.name for i in graph.initializer} | {i.name for i in graph.input}
    prefix = "vision_mlp"
    while any(t.startswith(prefix) for t in taken):
        prefix += "_"
    return prefix


def _said(agrees) -> str:
    bound = vision_fusion.INTEGER_TOLERANCE if agrees.exact else vision_fusion.TOLERANCE
    return f"within {agrees.figures[0]:.1e} relative of the whole graph's; bound {bound}"


def _constants(graph) -> tuple[set[str], set[str], set[str]]:
    """(initializers, Constant outputs and the outputs of nodes reading only
    those (a QDQ graph's DequantizeLinear of a weight); those of them known to
    be the same for every row: rank <= 1, a scalar or one value per column (a
    one-element tensor of higher rank would raise the rank it broadcasts
    with, and move the sequence axis); the one-element ones of those)."""
    known, small, scalars = set(), set(), set()

    def note(name: str, dims) -> None:
        if len(dims) <= 1:
            small.add(name)
            if _elements(dims) == 1:
                scalars.add(name)

    for i in graph.initializer:
        known.add(i.name)
        note(i.name, i.dims)
    for n in graph.node:
        if n.op_type == "Constant":
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                note(n.output[0], value.dims)
        if all(not t or t in known for t in n.input):
            known.update(n.output)
    return known, small, scalars


def _elements(dims) -> int:
    return math.prod(int(d) for d in dims)


class _Mlp:
    """One MLP region: its nodes in graph order, the tensor they read (entry,
    (B, S, D)) and the one they give (exit, (B, S, D))."""

    def __init__(self, entry: str, nodes: list, exit: str):
        self.entry, self.nodes, self.exit = entry, nodes, exit


def _mlps(nodes: list, constants: set[str], small: set[str], scalars: set[str],
          outputs: set[str]) -> list[_Mlp]:
    """Each MLP in graph order (see the module docstring); a node is in one at
    most. small: the constants the same for every row (biases, scalars);
    scalars: the one-element ones; outputs: the graph's outputs (no tensor
    inside an MLP may be one: the cut removes it)."""
    producer, single = vision_fusion.links(nodes)
    readers: dict[str, list] = {}
    for n in nodes:
        for t in n.input:
            readers.setdefault(t, []).append(n)

    def takes(n, ops, x: str) -> bool:
        """n is one of `ops` reading x first and constants besides."""
        return n is not None and n.op_type in ops and n.input[0] == x and \
            all(not t or t in constants for t in n.input[1:])

    def then(x: str, ops):
        """The one reader of x, if it is one of `ops` taking x first (a
        quantizer with one scale: a per-channel or blocked one along the
        sequence would not cut)."""
        n = single(x)
        return n if takes(n, ops, x) and per_tensor(n) else None

    def per_tensor(n) -> bool:
        return n.op_type not in ("QuantizeLinear", "DequantizeLinear") or \
            all(not t or t in scalars for t in n.input[1:])

    def row_constant(t: str) -> bool:
        """A constant the same for every row: one value, or one per column."""
        return t in small or not t

    def bias(x: str):
        n = single(x)
        return n if takes(n, ("Add",), x) and len(n.input) == 2 and row_constant(n.input[1]) \
            else None

    def activation(x: str) -> tuple[list, str] | None:
        """The elementwise ops from x to the one tensor the rest of the MLP
        reads (a bias Add; GELU as FastGelu or written out with Erf or Tanh;
        quick_gelu x * sigmoid(a * x)), each reading x, their own tensors
        and row constants only; None unless every reader of x and of their
        tensors is one of them, and one tensor leaves them."""
        region, seen, todo = [], set(), [x]
        while todo:  # the elementwise readers of x, theirs, ...: up to fc2 or its quantizer
            for n in readers.get(todo.pop(), []):
                if id(n) not in seen and n.op_type in ELEMENTWISE:
                    seen.add(id(n))
                    region.append(n)
                    todo.extend(n.output)
        made = {x} | {t for n in region for t in n.output}
        if not region or any(r.op_type not in ELEMENTWISE for r in readers[x]) or \
                not all(t in made or row_constant(t) for n in region for t in n.input):
            return None  # fc1's output, or the activation, mixes with a tensor of the layer
        leaving = {t for n in region for t in n.output
                   if not readers.get(t) or any(id(r) not in seen for r in readers[t])}
        if len(leaving) != 1 or leaving & outputs:
            return None
        return region, leaving.pop()

    used: set[int] = set()
    order = {id(n): i for i, n in enumerate(nodes)}
    out = []
    for fc1 in nodes:
        if id(fc1) in used or fc1.op_type not in PROJECTIONS or \
                not takes(fc1, PROJECTIONS, fc1.input[0]):
            continue
        region, entry = [], fc1.input[0]
        dq = producer.get(entry)
        if dq is not None and single(entry) is fc1 and per_tensor(dq) and \
                takes(dq, ("DequantizeLinear",), dq.input[0]):
            region, entry = [dq], dq.input[0]
        region.append(fc1)
        x = fc1.output[0]
        act = activation(x)
        if act is None:
            continue
        region += act[0]
        x = act[1]
        for ops in (("QuantizeLinear",), ("DequantizeLinear",)):
            if (n := then(x, ops)) is not None:
                region.append(n)
                x = n.output[0]
        fc2 = then(x, PROJECTIONS)
        if fc2 is None:
            continue
        region.append(fc2)
        x = fc2.output[0]
        if (add := bias(x)) is not None:
            region.append(add)
            x = add.output[0]
        if any(id(n) in used for n in region) or \
                any(t in outputs for n in region for t in n.output if t != x):
            continue
        used.update(id(n) for n in region)
        out.append(_Mlp(entry, sorted(region, key=lambda n: order[id(n)]), x))
    return out


def _sequence_lengths(path: Path, model, tensors: list[str]
                      ) -> tuple[dict[str, int] | None, str]:
    """(S of each of `tensors` (B, S, D) in one run of the graph on a random
    input of its declared shapes (batch 1; None for a tensor of another rank),
    ""), or (None, why not): an input dimension other than the first is not
    fixed (S would vary with the image), an input is not a float32 tensor, or
    the run fails."""
    import numpy as np
    onnx, ort = require("onnx", "cutting the vision MLPs"), \
        require("onnxruntime", "cutting the vision MLPs")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {o.name for o in probe.graph.output}
    wanted = list(dict.fromkeys(tensors))
    probe.graph.output.extend(onnx.ValueInfoProto(name=t) for t in wanted if t not in declared)
    feeds = {}
    rng = np.random.default_rng(0)
    for i in probe.graph.input:
        kind = i.type.tensor_type.elem_type
        dims = [d.dim_value if d.HasField("dim_value") else None
                for d in i.type.tensor_type.shape.dim]
        if kind != onnx.TensorProto.FLOAT:  # as the agreement check's random input
            return None, f"its input {i.name} is not a float32 tensor"
        if any(d is None for d in dims[1:]):
            return None, f"its sequence length is not fixed (input {i.name}: {dims})"
        feeds[i.name] = rng.standard_normal([1, *dims[1:]]).astype(
            onnx.helper.tensor_dtype_to_np_dtype(kind))
    # beside the graph: its external weights resolve against this folder
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".probe.onnx") as f:
        f.write(probe.SerializeToString())
        f.flush()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(f.name, opts, providers=["CPUExecutionProvider"])
            shapes = [v.shape for v in session.run(wanted, feeds)]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            return None, f"onnxruntime could not run it ({first[:120]})"
    # S of a (B, S, D) tensor; None for another rank (an MLP on pooled features)
    return {t: int(shape[1]) if len(shape) == 3 else None
            for t, shape in zip(wanted, shapes)}, ""


def _piece_sizes(length: int, rows: int) -> list[int]:
    """`length` rows in the fewest pieces of at most `rows`, as even as can be."""
    k = math.ceil(length / rows)
    return [length // k + (1 if i < length % k else 0) for i in range(k)]


def _cut(helper, mlp: _Mlp, sizes: list[int], name: str) -> dict:
    """{id(node): its replacement nodes}: the MLP's last node becomes the
    Split, every piece's copy of the MLP and the Concat, the others go (in
    the last node's place every input of the MLP is already made: a QDQ graph
    may compute fc2's weight just before fc2)."""
    import numpy as np
    k = len(sizes)
    split_sizes = helper.make_node("Constant", [], [f"{name}_sizes"], name=f"{name}_sizes",
                                   value=helper.make_tensor(f"{name}_sizes", INT64, [k],
                                                            np.asarray(sizes, np.int64)))
    pieces = [f"{name}_in_{j}" for j in range(k)]
    made = [split_sizes, helper.make_node("Split", [mlp.entry, f"{name}_sizes"], pieces,
                                          name=f"{name}_split", axis=1)]
    outs = []
    for j, piece in enumerate(pieces):
        renamed = {mlp.entry: piece}  # the MLP's own tensors -> this piece's
        for n in mlp.nodes:
            for t in n.output:
                renamed[t] = f"{t}_{name}_{j}"
            copy = helper.make_node(n.op_type, [renamed.get(t, t) for t in n.input],
                                    [renamed[t] for t in n.output],
                                    name=f"{name}_{n.name or n.output[0]}_{j}",
                                    domain=n.domain or None)
            copy.attribute.extend(n.attribute)
            made.append(copy)
        outs.append(renamed[mlp.exit])
    made.append(helper.make_node("Concat", outs, [mlp.exit], name=f"{name}_concat", axis=1))
    last = mlp.nodes[-1]
    return {id(last): made, **{id(n): [] for n in mlp.nodes[:-1]}}
