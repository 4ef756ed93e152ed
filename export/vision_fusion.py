"""Fused onnxruntime ops in the vision tower, for artifacts that run on
onnxruntime only (--decoder-flavour ort): its attention as MultiHeadAttention
and its tanh GELU as FastGelu.

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

Both are contrib ops (no TensorRT, no other runtime), so artifacts holding a
portable decoder keep the standard graph. The fused graph must give the same
features as the original on a random input, else the graph is kept as exported
and the log says why.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from vlmedge.lazy import require

TOLERANCE = 1e-4  # max |fused - original| / max |original| on one random input


def _scalar(value) -> float | None:
    """A one-element constant's value; None for anything else (or no constant)."""
    if value is None:
        return None
    a = np.asarray(value)
    return float(a.reshape(())) if a.size == 1 and a.dtype.kind in "fiu" else None


def _links(nodes: list) -> tuple[dict, Callable]:
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
    producer, single = _links(nodes)

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
    producer, single = _links(nodes)

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


def fuse(path: Path, log: Callable[[str], None]) -> bool:
    """Rewrites path (vision.onnx + its .data) in place with the fused ops
    that match (attention: all cores or none) if the features agree; returns
    whether it did."""
    onnx = require("onnx", "fusing the vision attention")
    numpy_helper = onnx.numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def constant(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        node = consts.get(name)
        if node is not None and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    nodes, why = _attention(list(graph.node), constant)
    nodes, gelus = _gelu(nodes or list(graph.node), constant)
    attention = sum(n.op_type == "MultiHeadAttention" for n in nodes)
    kept = f"attention kept as exported ({why})" if why else ""
    if not attention and not gelus:
        log(f"[vision-fusion] kept as exported: {why or 'no attention core'}; no tanh GELU")
        return False
    del graph.node[:]
    graph.node.extend(_pruned(graph, nodes))
    used = {i for n in graph.node for i in n.input}
    for i in reversed(range(len(graph.initializer))):  # in place: no copy of the weights
        if graph.initializer[i].name not in used:
            del graph.initializer[i]
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    work = path.parent / ".vision-fused"
    work.mkdir(exist_ok=True)
    try:
        onnx.save(model, str(work / path.name), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=path.name + ".data")
        # the weights' protobuf copy goes before the check's sessions load them
        del model, graph, inits, consts, nodes
        diff = _difference(path, work / path.name)
        if diff is None or diff > TOLERANCE:
            log(f"[vision-fusion] kept as exported: the fused graph's features differ "
                f"({'did not run' if diff is None else f'{diff:.1e} relative'})")
            return False
        for name in (path.name, path.name + ".data"):
            (work / name).replace(path.parent / name)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    done = [f"{attention} attention cores as MultiHeadAttention"] if attention else []
    done += [f"{gelus} tanh GELUs as FastGelu"] if gelus else []
    log(f"[vision-fusion] {', '.join(done)} (onnxruntime contrib ops; features within "
        f"{diff:.1e} of the exported graph)" + (f"; {kept}" if kept else ""))
    return True


def _difference(original: Path, fused: Path) -> float | None:
    """max |fused - original| / max |original| over every output, on one
    random input of the graph's own shapes (batch 1); None if either fails."""
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
    scale = max(float(np.abs(w).max()) for w in want) or 1.0
    return max(float(np.abs(w - g).max()) for w, g in zip(want, got)) / scale
