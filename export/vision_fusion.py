"""Fused onnxruntime ops in the vision tower, for artifacts that run on
onnxruntime only (--decoder-flavour ort): its attention as MultiHeadAttention,
its tanh GELU as FastGelu, and in an int8 (QDQ) tower each biased projection
as one MatMulIntegerToFloat that adds its bias (_integer_matmuls).

Attention. torch.onnx writes a ViT's scaled-dot-product attention as its
decomposition:

    q (B, S, H*D) -> Reshape (B, S, H, D) -> Transpose (B, H, S, D) -> Mul sqrt(scale)
    k (B, S, H*D) -> Reshape/Transpose ... (B, H, D, S)           -> Mul sqrt(scale)
    MatMul -> scores (B, H, S, S) -> Softmax -> MatMul with v (B, H, S, D)
           -> Transpose (B, S, H, D) -> Reshape (B, S, H*D)

so each layer materializes two (B, H, S, S) fp32 tensors: 48 MB each for
SmolVLM's 1,024 patches and 12 heads. com.microsoft.MultiHeadAttention takes
q, k, v as (B, S, H*D) and returns (B, S, H*D) without keeping the scores: on
SmolVLM-256M's tower at 512 px it lowers the peak activation memory from 191
to 80 MB and runs ~5% faster. The rewrite is all or nothing: every Softmax of
the graph must be such an attention core (an unmasked one: a masked tower's
pattern has an Add and is left alone).

GELU. gelu(approximate="tanh") is written as eight elementwise ops over the
(B, S, 4*hidden) MLP activation (Pow, Mul, Add, Tanh, ...), each a pass over
memory, after the fc1 bias Add: 17% of SmolVLM's int8 vision time.
com.microsoft.FastGelu(x, bias) is the same formula in one pass, bias included.

All three are contrib ops (no TensorRT, no other runtime), so an artifact holding
a portable decoder keeps the standard graph as "vision"; with both decoder
flavours (--decoder-flavour both) the fused graph is written beside it as
vision_ort.onnx, after any quantization, reading vision.onnx.data: the fusion
drops nodes and keeps the tensors it uses, so the two graphs share one weights
file (int8 too: the attention cores stay fp32 in the QDQ graph,
calibration/graphs.py, so they match the same pattern). An ort-only
artifact's tower is fused before quantization, and the QDQ graph made of it
takes the projection rewrite afterwards, in place. The fused graph must
give the same features as the original on a random input, else it is not
written and the log says why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from vlmedge.lazy import require

TOLERANCE = 1e-4  # max |fused - original| / max |original| on one random input
# A quantized graph cannot meet TOLERANCE: a rounding difference of 1e-7 in an
# fp32 op flips a QuantizeLinear step, and 12 layers carry it on (SmolVLM-256M's
# int8 tower, fused against unfused: 3e-2 relative, feature cosine 0.9995; each
# at cosine 0.9992 from the fp32 features). There the rewrite, first proven
# within TOLERANCE on the same model's fp32 graph, is held to the int8 gate's
# own bound: mean feature cosine (calibration/gate.py's default target).
QUANTIZED_COSINE = 0.99
# The int8 projections' rewrite alone (_integer_matmuls) changes no integer:
# only the bias add moves into the GEMM's output pass (where a fused
# multiply-add could round one float differently and flip a later
# quantization step). It gave bit-identical features on the demo's trained
# tower and SmolVLM-256M's; one layer's bias left out moved the demo's by
# 3e-3 to 5e-2 relative (at cosines up to 0.99999, which a cosine bound
# would pass), so it is held to a relative bound below that.
INTEGER_TOLERANCE = 1e-3


def _scalar(value) -> float | None:
    """A one-element constant's value; None for anything else (or no constant)."""
    if value is None:
        return None
    a = np.asarray(value)
    return float(a.reshape(())) if a.size == 1 and a.dtype.kind in "fiu" else None


def links(nodes: list) -> tuple[dict, Callable]:
    """tensor -> its producing node, and single(tensor): the one node that
    reads it (None when none or several do)."""
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def single(t: str):
        c = consumers.get(t, [])
        return c[0] if len(c) == 1 else None
    return producer, single


def _attention(nodes: list, constant) -> tuple[list, str]:
    """`nodes` with each attention core replaced by one MultiHeadAttention
    (dead layout nodes are pruned later), or ([], why)."""
    helper = require("onnx", "fusing the vision attention").helper
    producer, single = links(nodes)

    def layout_source(t: str) -> str:
        """Up through Reshape/Transpose to the (B, S, H*D) projection output."""
        while t in producer and producer[t].op_type in ("Reshape", "Transpose"):
            t = producer[t].input[0]
        return t

    replace = {}  # id(final Reshape node) -> MultiHeadAttention node
    softmaxes = [n for n in nodes if n.op_type == "Softmax"]
    if not softmaxes:
        return [], "no attention (Softmax) in the graph"
    for i, sm in enumerate(softmaxes):
        axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
        qk = producer.get(sm.input[0])
        if axis != -1 or qk is None or qk.op_type != "MatMul":
            return [], f"{sm.name}: its scores are not a plain q @ k^T (a mask or another form)"
        mq, mk = producer.get(qk.input[0]), producer.get(qk.input[1])
        if mq is None or mk is None or mq.op_type != "Mul" or mk.op_type != "Mul":
            return [], f"{sm.name}: q and k are not scaled separately"
        sq, sk = _scalar(constant(mq.input[1])), _scalar(constant(mk.input[1]))
        pv = single(sm.output[0])
        back = single(pv.output[0]) if pv is not None else None
        merge = single(back.output[0]) if back is not None else None
        if sq is None or sk is None or pv is None or pv.op_type != "MatMul" or \
                pv.input[0] != sm.output[0] or back is None or back.op_type != "Transpose" or \
                merge is None or merge.op_type != "Reshape":
            return [], f"{sm.name}: not the softmax(q k^T) v -> (B, S, H*D) core"
        split = producer.get(producer[mq.input[0]].input[0]) \
            if producer.get(mq.input[0]) is not None else None
        shape = _scalar_shape(constant(split.input[1])) if split is not None and \
            split.op_type == "Reshape" else None
        if shape is None or len(shape) != 4 or shape[2] < 1:
            return [], f"{sm.name}: no (B, S, heads, head_dim) reshape of q"
        q, k, v = (layout_source(t) for t in (mq.input[0], mk.input[0], pv.input[1]))
        if len({q, k, v}) != 3 or any(t not in producer or producer[t].op_type not in
                                      ("Add", "MatMul") for t in (q, k, v)):
            return [], f"{sm.name}: q, k, v are not three projections"
        replace[id(merge)] = helper.make_node(
            "MultiHeadAttention", [q, k, v], [merge.output[0]], domain="com.microsoft",
            name=f"vision_attention_{i}", num_heads=int(shape[2]), scale=sq * sk)
    return [replace.get(id(n), n) for n in nodes], ""


GELU_TANH = (0.7978845608, 0.044715)  # sqrt(2 / pi), and the cubic term's weight


def _gelu(nodes: list, constant) -> tuple[list, int]:
    """`nodes` with each gelu(x, approximate="tanh") written as
    x * (0.5 * (1 + tanh(c1 * (x + c2 * x ** 3)))) replaced by one FastGelu,
    which takes the fc1 bias too where x = MatMul + bias; and how many."""
    helper = require("onnx", "fusing the vision GELU").helper
    producer, single = links(nodes)

    def split(node, op: str, value: float | None, rel: float = 1e-5):
        """(constant, other input) of a binary `op` node whose one input is the
        scalar `value` (any scalar when None), else None."""
        if node is None or node.op_type != op or len(node.input) != 2:
            return None
        for a, b in (node.input, node.input[::-1]):
            c = _scalar(constant(a))
            if c is not None and (value is None or abs(c - value) <= rel * abs(value)):
                return c, b
        return None

    replace = {}
    for tanh in (n for n in nodes if n.op_type == "Tanh"):
        inner = split(producer.get(tanh.input[0]), "Mul", GELU_TANH[0])
        plus = producer.get(inner[1]) if inner else None
        if plus is None or plus.op_type != "Add":
            continue
        for x, cubic in (plus.input, plus.input[::-1]):
            scaled = split(producer.get(cubic), "Mul", GELU_TANH[1])
            power = split(producer.get(scaled[1]), "Pow", 3.0, 0) if scaled else None
            if power and power[1] == x:
                break
        else:
            continue
        add_one = single(tanh.output[0])                        # 1 + tanh(...)
        if split(add_one, "Add", 1.0, 0) is None:
            continue
        halve = single(add_one.output[0])                       # 0.5 * (1 + tanh(...))
        if split(halve, "Mul", 0.5, 0) is None:
            continue
        final = single(halve.output[0])                         # x * 0.5 * (...)
        if final is None or final.op_type != "Mul" or x not in final.input:
            continue
        inputs = [x]
        biased = producer.get(x)
        if biased is not None and biased.op_type == "Add":
            for a, b in (biased.input, biased.input[::-1]):
                bias = constant(b)
                if bias is not None and np.asarray(bias).ndim == 1 and a in producer and \
                        producer[a].op_type == "MatMul":
                    inputs = [a, b]
                    break
        replace[id(final)] = helper.make_node("FastGelu", inputs, [final.output[0]],
                                              domain="com.microsoft",
                                              name=f"vision_gelu_{len(replace)}")
    return [replace.get(id(n), n) for n in nodes], len(replace)


def _integer_matmuls(nodes: list, constant, declared, outputs: set
                     ) -> tuple[list, list, int]:
    """`nodes` with each int8 projection of a QDQ graph that has a bias after
    it written as one MatMulIntegerToFloat that adds the bias in its output
    pass; the initializers it adds (uint8 zero points); and how many.

    The pattern (calibration/int8.py's static QDQ, symmetric int8 weights):

        x -> QuantizeLinear -> DequantizeLinear -+
                                                  MatMul (B, S, K) x (K, N) -> + bias (N,)
        w int8 (K, N) -> DequantizeLinear (axis 1) -+

    where the bias is an Add of a 1-D constant or FastGelu's bias input (the
    GELU then runs without one: its bias form also allocates a (B, S, N)
    scratch copy). onnxruntime turns the QDQ MatMul into MatMulIntegerToFloat
    itself but leaves the Add a pass of its own over the activation (60 such
    passes in SmolVLM-256M's tower). Its fast x86 kernels take uint8
    activations (int8 ones measured 9x slower), so an int8 x is quantized as
    uint8 at zero point + 128: the same integers shifted, the same products
    and results on any CPU (onnxruntime's own QDQ transform does this on x86;
    the speed on ARM was not measured). declared(name): an initializer's
    (numpy dtype, shape) without reading its data, else None; outputs: the
    graph's output names (a MatMul whose output is one keeps it)."""
    onnx = require("onnx", "fusing the vision projections")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    producer, single = links(nodes)
    replace: dict = {}      # id(node) -> its replacement (None: dropped)
    after: dict = {}        # id(QuantizeLinear) -> the uint8 QuantizeLinear made beside it
    made_zero: dict = {}    # uint8 zero point value -> initializer name
    added = []
    taken = {t for n in nodes for t in (*n.input, *n.output)} | set(outputs)

    def fresh(name: str) -> str:
        """name, or name_2, name_3 ...: one no tensor of the graph has."""
        out, i = name, 1
        while out in taken:
            i += 1
            out = f"{name}_{i}"
        taken.add(out)
        return out

    def scalar_const(name: str):
        value = constant(name) if name else None
        return None if value is None or np.asarray(value).size != 1 else np.asarray(value)

    def uint8_input(q) -> tuple[str, str] | None:
        """(uint8 activation, its zero point) for QuantizeLinear q's output."""
        zp = scalar_const(q.input[2]) if len(q.input) > 2 else None
        if zp is None or zp.dtype not in (np.int8, np.uint8):
            return None
        if zp.dtype == np.uint8:
            return q.output[0], q.input[2]
        value = int(zp.reshape(())) + 128
        if value not in made_zero:
            made_zero[value] = fresh(f"vision_uint8_zero_point_{value}")
            added.append(numpy_helper.from_array(np.array(value, np.uint8), made_zero[value]))
        if id(q) not in after:
            after[id(q)] = helper.make_node(
                "QuantizeLinear", [q.input[0], q.input[1], made_zero[value]],
                [fresh(q.output[0] + "_uint8")], name=(q.name or q.output[0]) + "_uint8")
        return after[id(q)].output[0], made_zero[value]

    count = 0
    for mm in (n for n in nodes if n.op_type == "MatMul"):
        dx, dw = (producer.get(t) for t in mm.input)
        if dx is None or dw is None or dx.op_type != "DequantizeLinear" or \
                dw.op_type != "DequantizeLinear" or single(dx.output[0]) is not mm or \
                mm.output[0] in outputs:
            continue
        q = producer.get(dx.input[0])
        weight = declared(dw.input[0])  # (dtype, (K, N)): the weights are not read
        if q is None or q.op_type != "QuantizeLinear" or weight is None or \
                weight[0] != np.int8 or len(weight[1]) != 2:
            continue
        n_out = weight[1][1]
        # the activation's QDQ pair: one scalar scale and zero point on both sides
        sq, sd = scalar_const(q.input[1]), scalar_const(dx.input[1])
        zq = scalar_const(q.input[2]) if len(q.input) > 2 else None
        zd = scalar_const(dx.input[2]) if len(dx.input) > 2 else None
        if sq is None or sd is None or zq is None or zd is None or \
                float(sq.reshape(())) != float(sd.reshape(())) or \
                int(zq.reshape(())) != int(zd.reshape(())):
            continue
        # the weights: per output column (axis 1) or one scale, symmetric
        axis = next((a.i for a in dw.attribute if a.name == "axis"), 1)
        scale = constant(dw.input[1])
        zw = constant(dw.input[2]) if len(dw.input) > 2 and dw.input[2] else None
        per_column = scale is not None and scale.shape == (n_out,) and axis in (1, -1)
        if scale is None or scale.dtype != np.float32 or sd.dtype != np.float32 or \
                not (scale.size == 1 or per_column) or (zw is not None and np.any(zw)):
            continue
        user = single(mm.output[0])
        bias = out = None
        if user is not None and user.op_type == "Add":
            other = [t for t in user.input if t != mm.output[0]]
            value = constant(other[0]) if len(other) == 1 else None
            if value is not None and value.dtype == np.float32 and value.shape == (n_out,):
                bias, out = other[0], user.output[0]
                replace[id(user)] = None
        elif user is not None and user.op_type == "FastGelu" and len(user.input) == 2 and \
                user.input[0] == mm.output[0]:
            value = constant(user.input[1])
            if value is not None and value.dtype == np.float32 and value.shape == (n_out,):
                bias, out = user.input[1], mm.output[0]
                replace[id(user)] = helper.make_node(
                    "FastGelu", [user.input[0]], list(user.output), domain="com.microsoft",
                    name=user.name)
        if bias is None:
            continue  # no bias to fold: onnxruntime makes the same op of it itself
        x = uint8_input(q)
        if x is None:
            replace.pop(id(user), None)
            continue
        replace[id(mm)] = helper.make_node(
            "MatMulIntegerToFloat", [x[0], dw.input[0], dx.input[1], dw.input[1], x[1], "", bias],
            [out], domain="com.microsoft", name=(mm.name or out) + "_integer")
        count += 1
    new = []
    for n in nodes:
        r = replace.get(id(n), n)
        if r is not None:
            new.append(r)
        if id(n) in after:
            new.append(after[id(n)])
    return new, added, count


def _scalar_shape(value) -> list[int] | None:
    if value is None:
        return None
    a = np.asarray(value).reshape(-1)
    return [int(x) for x in a] if a.dtype.kind in "iu" else None


def _pruned(graph, nodes: list) -> list:
    """`nodes` without those no graph output depends on any more."""
    live = {o.name for o in graph.output}
    keep = []
    for n in reversed(nodes):
        if any(o in live for o in n.output):
            keep.append(n)
            live.update(n.input)
    return keep[::-1]


def fuse(path: Path, log: Callable[[str], None], beside: str | None = None,
         quantized: bool = False) -> bool:
    """The fused ops that match (attention: all cores or none; with
    `quantized`, the int8 projections' biases too), kept if the features agree
    (within TOLERANCE; `quantized`: QUANTIZED_COSINE, or INTEGER_TOLERANCE
    relative where the projection rewrite is all that changed); returns
    whether they were. Without `beside`, path (vision.onnx + its .data) is
    rewritten in place. With it, the fused graph is written as that file in
    path's folder, its weights left in path's data file (no copy on disk or in
    memory here)."""
    onnx = require("onnx", "fusing the vision attention")
    numpy_helper = onnx.numpy_helper
    model = onnx.load(str(path), load_external_data=beside is None)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def constant(name: str):
        if name in inits:  # an external one (beside) is read from the data file
            return numpy_helper.to_array(inits[name], base_dir=str(path.parent))
        node = consts.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def declared(name: str):
        t = inits.get(name)
        if t is None:
            return None
        return onnx.helper.tensor_dtype_to_np_dtype(t.data_type), tuple(t.dims)

    # an ort-only artifact's int8 graph was fused before quantization: no new cores
    fused_before = any(n.op_type == "MultiHeadAttention" for n in graph.node)
    nodes, why = _attention(list(graph.node), constant)
    nodes, gelus = _gelu(nodes or list(graph.node), constant)
    added, integer = [], 0
    if quantized:  # on the pruned list: a fused GELU's old bias Add no longer reads fc1
        nodes, added, integer = _integer_matmuls(_pruned(graph, nodes), constant, declared,
                                                 {o.name for o in graph.output})
    attention = 0 if why else sum(n.op_type == "MultiHeadAttention" for n in nodes)
    if why and fused_before:
        why = "attention fused already"
    kept = f"attention kept as exported ({why})" if why and not fused_before else ""
    if not attention and not gelus and not integer:
        log(f"[vision-fusion] {'no ' + beside if beside else 'kept as exported'}: "
            f"{why or 'no attention core'}; no tanh GELU"
            + ("; no biased int8 projection" if quantized else ""))
        return False
    del graph.node[:]
    graph.node.extend(_pruned(graph, nodes))
    graph.initializer.extend(added)
    used = {i for n in graph.node for i in n.input}
    for i in reversed(range(len(graph.initializer))):  # in place: no copy of the weights
        if graph.initializer[i].name not in used:
            del graph.initializer[i]
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    # The model moves into the saver, which drops it before the check's sessions
    # load the weights: one copy of a tower's weights in memory at a time.
    held = [model]
    del model, graph, inits, consts, nodes
    # the projection rewrite alone is exact on the integers: held closer
    agrees = Agreement(quantized, exact=bool(integer) and not attention and not gelus)
    if beside is not None:
        save_beside(onnx, held, path, path.parent / beside, agrees)
    else:
        _save_in_place(onnx, held, path, agrees)
    if not agrees.ok:
        log(f"[vision-fusion] {'not written' if beside else 'kept as exported'}: the fused "
            f"graph's features differ ({agrees})")
        return False
    done = [f"{attention} attention cores as MultiHeadAttention"] if attention else []
    done += [f"{gelus} tanh GELUs as FastGelu"] if gelus else []
    done += [f"{integer} biased int8 projections as MatMulIntegerToFloat"] if integer else []
    log(f"[vision-fusion] {', '.join(done)} (onnxruntime contrib ops; features {agrees} "
        f"of {path.name})" + (f", as {beside} beside it, reading its weights file"
                              if beside else "") + (f"; {kept}" if kept else ""))
    return True


class Agreement:
    """Whether the fused graph's features agree with the original's, and a
    phrase saying how closely (filled in by `measure`)."""

    def __init__(self, quantized: bool, exact: bool = False):
        self.quantized = quantized
        self.exact = exact  # the projection rewrite alone: INTEGER_TOLERANCE
        self.figures: tuple[float, float] | None = None  # (relative max diff, mean cosine)

    def measure(self, original: Path, fused: Path) -> bool:
        self.figures = _difference(original, fused)
        return self.ok

    @property
    def ok(self) -> bool:
        if self.figures is None:
            return False
        rel, cosine = self.figures
        if self.exact:
            return rel <= INTEGER_TOLERANCE
        return cosine >= QUANTIZED_COSINE if self.quantized else rel <= TOLERANCE

    def __str__(self) -> str:
        if self.figures is None:
            return "did not run"
        rel, cosine = self.figures
        if self.exact:
            return (f"within {rel:.1e} relative (bound {INTEGER_TOLERANCE} for the integer "
                    f"rewrite alone)")
        if self.quantized:
            return (f"at mean cosine {cosine:.5f} ({rel:.1e} relative; bound "
                    f"{QUANTIZED_COSINE} for a quantized graph)")
        return f"within {rel:.1e} relative"


def _save_in_place(onnx, held: list, path: Path, agrees: Agreement) -> None:
    """Writes the fused model (held[0], taken) over path and its data file if
    it agrees with the original (which stays when it does not)."""
    work = path.parent / ".vision-fused"
    work.mkdir(exist_ok=True)
    try:
        onnx.save(held.pop(), str(work / path.name), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=path.name + ".data")
        if agrees.measure(path, work / path.name):
            for name in (path.name, path.name + ".data"):
                (work / name).replace(path.parent / name)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


def save_beside(onnx, held: list, path: Path, dst: Path, agrees: Agreement) -> None:
    """Writes the fused model (held[0], taken) as dst, its external tensors
    still pointing into path's data file (same folder, same offsets), if it
    agrees with path's graph."""
    tmp = dst.with_name(dst.name + ".partial")
    onnx.save(held.pop(), str(tmp))  # the proto only: external tensors keep their location
    try:
        if agrees.measure(path, tmp):
            tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def _difference(original: Path, fused: Path) -> tuple[float, float] | None:
    """(max |fused - original| / max |original| over every output, the mean
    cosine of the last axis's vectors, the image features, of the worst
    output) on one random input of the graph's own shapes (batch 1); None if
    either fails."""
    ort = require("onnxruntime", "fusing the vision attention")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the fused graph's unused-initializer notes
    outputs = []
    try:
        for graph in (original, fused):  # one session at a time: a tower's weights once
            session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
            if not outputs:
                rng = np.random.default_rng(0)
                feeds = {}
                for i in session.get_inputs():
                    if i.type != "tensor(float)" or \
                            not all(isinstance(d, int) for d in i.shape[1:]):
                        return None
                    feeds[i.name] = rng.standard_normal([1, *i.shape[1:]]).astype(np.float32)
            outputs.append(session.run(None, feeds))
            del session
    except Exception:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        return None  # the caller keeps the graph as exported and says so
    want, got = outputs
    if [w.shape for w in want] != [g.shape for g in got]:
        return None  # a rewrite that changed a shape: not the same graph
    scale = max(float(np.abs(w).max()) for w in want) or 1.0
    rel = max(float(np.abs(w - g).max()) for w, g in zip(want, got)) / scale
    cosines = []
    for w, g in zip(want, got):
        w, g = w.astype(np.float64), g.astype(np.float64)
        nw, ng = np.linalg.norm(w, axis=-1), np.linalg.norm(g, axis=-1)
        both_zero = 1.0 * ((nw == 0) & (ng == 0))  # agree; one zero alone: cosine 0
        cos = np.where(nw * ng > 0, (w * g).sum(-1) / np.maximum(nw * ng, 1e-300), both_zero)
        cosines.append(float(cos.mean()))
    return rel, float(min(cosines))
