"""The machine's roofline, measured in the same run as the models, and what
the models ask of it.

- Memory bandwidth: an onnxruntime fp32 matrix-vector product (1, K) x (K, N)
  over a 128 MiB matrix (far beyond any cache), at the benchmark's thread
  count: the same kernel family (MLAS) a decode step spends its time in.
  Bytes moved = the matrix.
- GEMM throughput: onnxruntime fp32 (M, K) x (K, N), M = N = K = 1024,
  2 * M * N * K FLOPs per call.
- The bounds are the best of the repeats (what the machine can do; the
  machine is shared, so medians, also reported, run lower), probed before
  and after the systems, and the better of the two taken.
- FLOPs of a graph: 2 * multiply-adds of its MatMul / Gemm / Conv (and their
  integer forms), from ONNX shape inference with the input shapes fixed to
  the ones benchmarked (onnxruntime's symbolic shape inference; weights in
  external data are declared as inputs, never read).
- Bytes a decode step reads: every initializer of the decoder graph the
  system runs (weights, LM head, quantization scales) plus the KV cache.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlmedge.lazy import require

# Bytes per element of onnx element types (float8s: 1; uint4/int4: half a byte,
# two to a byte as DequantizeLinear's blocked int4 weights are stored).
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 16: 2, 17: 1, 18: 1,
             19: 1, 20: 1, 21: 0.5, 22: 0.5}
_FLOP_OPS = ("MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger", "FusedMatMul")


def _matmul_session(threads: int):
    """An onnxruntime session computing Y = A @ B with both as inputs (no
    copy of a big initializer into the model), or None without onnx."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])], "probe",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", "k"]),
         helper.make_tensor_value_info("B", TensorProto.FLOAT, ["k", "n"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", "n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up: first-call allocation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure(threads: int, repeats: int = 10, matrix_mib: int = 128) -> dict[str, Any]:
    """{bandwidth_gb_s, gemm_gflops} (best of the repeats), their medians, probe."""
    rng = np.random.default_rng(0)
    k = 4096
    n = matrix_mib * 2**20 // (4 * k)
    a = rng.standard_normal((1, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    g = 1024
    ga = rng.standard_normal((g, g), dtype=np.float32)
    gb = rng.standard_normal((g, g), dtype=np.float32)
    sess = _matmul_session(threads)
    if sess is not None:
        mv = _timed(lambda: sess.run(None, {"A": a, "B": b}), repeats)
        mm = _timed(lambda: sess.run(None, {"A": ga, "B": gb}), repeats)
        probe = "onnxruntime MatMul"
    else:  # numpy (BLAS) fallback where onnx is not installed
        mv = _timed(lambda: a @ b, repeats)
        mm = _timed(lambda: ga @ gb, repeats)
        probe = "numpy matmul"
    moved, flops = b.nbytes + a.nbytes + 4 * n, 2.0 * g**3
    return {"bandwidth_gb_s": moved / min(mv) / 1e9,
            "bandwidth_probe_bytes": int(moved),
            "bandwidth_gb_s_median": moved / float(np.median(mv)) / 1e9,
            "gemm_gflops": flops / min(mm) / 1e9,
            "gemm_gflops_median": flops / float(np.median(mm)) / 1e9,
            "probe": f"{probe}, {threads} thread(s): matvec 1x{k} @ {k}x{n} fp32 "
                     f"({b.nbytes / 2**20:.0f} MiB), gemm {g}^3"}


def combine(before: dict, after: dict) -> dict[str, Any]:
    """The probes before and after the systems ran: the better bound, and both."""
    keys = ("bandwidth_gb_s", "bandwidth_gb_s_median", "gemm_gflops", "gemm_gflops_median")
    out = {k: max(before[k], after[k]) for k in keys}
    out["probe"] = before["probe"]
    out["bandwidth_probe_bytes"] = before.get("bandwidth_probe_bytes")
    out["samples"] = {"before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}}
    return out


# -- what the graphs need -----------------------------------------------------
def _load_structure(path: Path):
    import onnx
    return onnx.load(str(path), load_external_data=False)


def _sizes(m) -> dict[str, int]:
    """Bytes of each initializer of a loaded graph (external data included, not read)."""
    return {t.name: int(math.ceil(int(np.prod(t.dims, dtype=np.int64)) *
                                  _ITEMSIZE.get(t.data_type, 4))) for t in m.graph.initializer}


def lookup_table_bytes(path: Path) -> int:
    """Bytes of the initializers only ever read by a Gather as its table (an
    embedding: a decode step reads one row of it, not all). A table the LM
    head's MatMul also reads (tied embeddings) is not one: a step reads it all."""
    try:
        m = _load_structure(path)
    except ImportError:
        return 0
    sizes = _sizes(m)
    gathered, other = set(), set()
    for node in m.graph.node:
        for k, name in enumerate(node.input):
            if name in sizes:
                (gathered if node.op_type == "Gather" and k == 0 else other).add(name)
    return sum(sizes[n] for n in gathered - other)


def gguf_bytes(path: Path) -> tuple[int, int]:
    """(bytes of every tensor of a GGUF file, bytes a decode step reads of
    them): all but token_embd when an output tensor of its own exists (a step
    reads one embedding row; a tied model's LM head reads the table whole)."""
    gguf = require("gguf", "the llama.cpp peer")
    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    table = tensors.get("token_embd.weight", 0) if "output.weight" in tensors else 0
    return total, total - table


def initializer_bytes(path: Path) -> int | None:
    """Bytes of every initializer of an ONNX file (external data included,
    not read), or None without the onnx package."""
    try:
        m = _load_structure(path)
    except ImportError:
        return None
    return sum(_sizes(m).values())


def graph_flops(path: Path, input_shapes: dict[str, list[int]]) -> float | None:
    """FLOPs of one run of the graph at `input_shapes` (2 per multiply-add of
    MatMul / Gemm / Conv); None when onnx is missing or shapes stay unknown."""
    try:
        import onnx
        from onnx import helper
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return None
    m = _load_structure(path)
    for inp in m.graph.input:
        shape = input_shapes.get(inp.name)
        dims = inp.type.tensor_type.shape.dim
        if shape is not None and len(shape) == len(dims):
            for d, v in zip(dims, shape):
                d.ClearField("dim_param")
                d.dim_value = int(v)
    inline = []
    for t in m.graph.initializer:  # big weights become inputs: their shapes suffice
        if t.data_location == onnx.TensorProto.EXTERNAL:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            inline.append(t)
    del m.graph.initializer[:]
    m.graph.initializer.extend(inline)
    try:
        m = SymbolicShapeInference.infer_shapes(m, auto_merge=True)
    except Exception:  # the inference raises assorted untyped errors on odd graphs
        return None
    return _count(m)


def _count(m) -> float | None:
    shapes = {t.name: list(t.dims) for t in m.graph.initializer}
    for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    total = 0.0
    for node in m.graph.node:
        if node.op_type not in _FLOP_OPS:
            continue
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        y = shapes.get(node.output[0])
        if not a or not b or not y or None in a + b + y:
            return None  # an unknown shape: better no figure than a wrong one
        if node.op_type in ("Conv", "ConvInteger"):
            # y (N, C_out, *spatial); w (C_out, C_in / group, *kernel)
            total += 2.0 * np.prod(y, dtype=np.float64) * np.prod(b[1:], dtype=np.float64)
        elif node.op_type == "Gemm":
            trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
            k = a[0] if trans_a else a[-1]
            total += 2.0 * np.prod(y, dtype=np.float64) * k
        else:  # MatMul family: y (..., M, N), contraction over a's last dim
            total += 2.0 * np.prod(y, dtype=np.float64) * a[-1]
    return float(total)


def kv_bytes_per_position(decoder: dict[str, Any], itemsize: int = 4) -> int:
    """KV cache bytes per token position: 2 (K and V) x layers x kv heads x head dim."""
    return 2 * int(decoder["num_layers"]) * int(decoder["num_kv_heads"]) * \
        int(decoder["head_dim"]) * itemsize


def decode_bytes_per_token(weight_bytes: int, kv_per_position: int, prompt_tokens: int,
                           new_tokens: int) -> float:
    """Bytes one decode step reads on average: all decoder weights, plus the
    KV cache at its mean length over the decode steps."""
    mean_len = prompt_tokens + new_tokens / 2.0
    return weight_bytes + kv_per_position * mean_len


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache (Linux sysfs), or None."""
    from pathlib import Path as _P
    sizes = []
    for f in _P("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        try:
            sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (ValueError, IndexError):
            continue
    return max(sizes) if sizes else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()
