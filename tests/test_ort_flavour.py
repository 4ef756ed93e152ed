"""The onnxruntime-native decoder flavour (--decoder-flavour ort) and weight-only
int4/int8 (export/ort_decoder.py, export/weight_only.py, runtime/decoders.py):
parity with PyTorch and with the portable flavour, the shared KV buffer's
semantics, the accuracy gate, and the refusals."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch_blocker import PRELUDE

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime_genai")

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import (ArtifactError, UnsupportedArchitectureError,  # noqa: E402
                            UserInputError)
from vlmedge.export import exporter  # noqa: E402
from vlmedge.models import demo_model_dir  # noqa: E402

QUESTIONS = ["describe the image.", "how many shapes are there?", "what color is the circle?"]


def _export(out, **kw):
    lines = []
    opts = dict(model_dir=demo_model_dir(), output=out)
    opts.update(kw)
    summary = exporter.run_export(exporter.ExportOptions(**opts), log=lines.append)
    return summary, lines


def _session(art, **kw):
    from vlmedge.runtime import VLMSession
    return VLMSession(art, provider="cpu", threads=1, **kw)


def _ops(path):
    m = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in m.graph.node}, [i.name for i in m.graph.input]


@pytest.fixture(scope="module")
def ort_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "demo-ort-fp32"
    summary, _ = _export(out, decoder_flavour="ort")
    return out, summary


@pytest.fixture(scope="module")
def ort_int4(tmp_path_factory):
    out = tmp_path_factory.mktemp("ort4") / "demo-ort-int4"
    summary, lines = _export(out, precision="int4", calib="synthetic", calib_size=8)
    return out, summary, lines


def _images(n=4):
    return [scenes.make_scene(scenes.EVAL_SEED_BASE + 31 * i).image for i in range(n)]


def test_ort_flavour_graph_and_manifest(ort_fp32):
    art, summary = ort_fp32
    m = manifest.load(art)
    assert m.decoder.flavour == "ort" and summary["decoder_flavour"] == "ort"
    ops, inputs = _ops(art / "decoder.onnx")
    # fused attention over the shared buffer; rotary inside, so no position_ids input
    assert "GroupQueryAttention" in ops and "SkipSimplifiedLayerNormalization" in ops
    assert "position_ids" not in inputs and "Concat" not in ops
    assert "inputs_embeds" in inputs and "input_ids" not in inputs
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["max_abs_diff_logits"] < 1e-4
    # onnxruntime only, so the vision tower's attention is its fused op: no
    # (B, heads, S, S) scores kept; validated against PyTorch like the rest
    vision_ops, _ = _ops(art / "vision.onnx")
    assert "MultiHeadAttention" in vision_ops and "Softmax" not in vision_ops
    assert v["max_abs_diff_image_features"] < 1e-3


def test_masked_attention_is_kept_as_exported(tmp_path):
    """An attention core with a mask (scores + mask before the Softmax) is not
    the unmasked pattern: the graph is left byte for byte as exported, and the
    log says why."""
    from vlmedge.export import vision_fusion

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (torch.nn.Linear(32, 32) for _ in range(3))

        def forward(self, x, mask):
            b, s, _ = x.shape
            q, k, v = (p(x).reshape(b, s, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return out.transpose(1, 2).reshape(b, s, 32)

    path = tmp_path / "masked.onnx"
    torch.onnx.export(Masked().eval(), (torch.randn(1, 6, 32), torch.zeros(1, 4, 6, 6)),
                      str(path), input_names=["x", "mask"], dynamo=True, external_data=False)
    before = path.read_bytes()
    lines = []
    assert not vision_fusion.fuse(path, lines.append)
    assert path.read_bytes() == before
    assert len(lines) == 1 and "kept as exported" in lines[0]
    # beside the graph (--decoder-flavour both): nothing written, one line
    assert not vision_fusion.fuse(path, lines.append, beside="vision_ort.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masked.onnx"]
    assert len(lines) == 2 and lines[1].startswith("[vision-fusion] no vision_ort.onnx: ")


@pytest.mark.parametrize("family, gelus", [("internvl", 0), ("idefics3", 1)])
def test_family_towers_take_the_fused_ops(family, gelus, tmp_path):
    """InternViT (separate q/k/v projections, exact GELU) and SigLIP as Idefics3
    exports them (tanh GELU): every attention core fuses, and fuse() keeps the
    result only when its features equal the exported graph's (1e-4)."""
    from test_families import build_idefics3
    from test_internvl import build_internvl

    from vlmedge.export import vision_fusion
    src = {"internvl": build_internvl, "idefics3": build_idefics3}[family](tmp_path / "src")
    _export(tmp_path / "art", model_dir=src, validate=False)
    lines = []
    assert vision_fusion.fuse(tmp_path / "art" / "vision.onnx", lines.append), lines
    ops = [n.op_type for n in onnx.load(str(tmp_path / "art" / "vision.onnx"),
                                        load_external_data=False).graph.node]
    assert ops.count("MultiHeadAttention") >= 1 and "Softmax" not in ops
    assert ops.count("FastGelu") == gelus


def test_scores_scaled_by_a_tensor_are_kept_as_exported(tmp_path):
    """q and k scaled by a graph input (no constant to read a scale from): the
    graph is kept as exported with one line, not an error."""
    from onnx import TensorProto, helper

    from vlmedge.export import vision_fusion
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 4, 4])
          for n in ("q", "k", "s", "y")]
    nodes = [helper.make_node("Mul", ["q", "s"], ["qs"]),
             helper.make_node("Mul", ["k", "s"], ["ks"]),
             helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["y"], axis=-1)]
    path = tmp_path / "vision.onnx"
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", io[:3], io[3:]),
                                opset_imports=[helper.make_opsetid("", 17)]), str(path))
    before = path.read_bytes()
    lines = []
    assert not vision_fusion.fuse(path, lines.append)
    assert path.read_bytes() == before and "kept as exported" in lines[0]


def test_tanh_gelu_becomes_fast_gelu_with_its_bias(tmp_path):
    """gelu(approximate="tanh") after a biased Linear (SigLIP's MLP) becomes one
    FastGelu(x, bias); the exact (erf) GELU is left alone; outputs unchanged."""
    import onnxruntime as ort

    from vlmedge.export import vision_fusion

    class Mlp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = (torch.nn.Linear(16, 16) for _ in range(3))

        def forward(self, x):
            h = torch.nn.functional.gelu(self.fc1(x), approximate="tanh")
            return torch.nn.functional.gelu(self.fc3(self.fc2(h)))  # exact: erf

    path = tmp_path / "vision.onnx"
    x = torch.randn(1, 5, 16)
    torch.onnx.export(Mlp().eval(), (x,), str(path), input_names=["pixel_values"],
                      dynamo=True, external_data=False, opset_version=18)  # as the export
    want = ort.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})[0]
    lines = []
    assert vision_fusion.fuse(path, lines.append)
    assert "1 tanh GELUs as FastGelu" in lines[0] and "MultiHeadAttention" not in lines[0]
    graph = onnx.load(str(path))
    fast = [n for n in graph.graph.node if n.op_type == "FastGelu"]
    assert len(fast) == 1 and len(fast[0].input) == 2  # the fc1 bias folded in
    assert "Tanh" not in {n.op_type for n in graph.graph.node}
    assert "Erf" in {n.op_type for n in graph.graph.node}
    got = ort.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


# The hand-made QDQ projections: (tag, bias after the MatMul, weight zero point,
# weight scale axis, rewritten?). a: bias Add; b: FastGelu with its bias; c:
# asymmetric weights; d: no bias (onnxruntime fuses it itself); e: bias Add then
# a tanh GELU written out, fused in the same call; f1/f2: one DequantizeLinear of
# x read by both; g: per-row (axis 0) weight scales; h: a 1-element bias; i: its
# MatMul's output is also a graph output.
PROJECTIONS = [("a", "add", 0, 1, True), ("b", "fast_gelu", 0, 1, True),
               ("c", "add", 3, 1, False), ("d", None, 0, 1, False),
               ("e", "tanh_gelu", 0, 1, True), ("f1", "add", 0, 1, False),
               ("f2", "add", 0, 1, False), ("g", "add", 0, 0, False),
               ("h", "add1", 0, 1, False), ("i", "add_seen", 0, 1, False)]


def _qdq_projections(path, x_zero_point=np.int8(0)):
    """A QDQ graph (1, 6, 64) -> one (1, 6, 32) output per PROJECTIONS row, each
    an int8 projection of one quantized x, the way calibration/int8.py writes
    them (a DequantizeLinear of x per consumer, except f1/f2)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    k, n = 64, 32
    consts = {"xs": np.array(0.02, np.float32), "xz": np.array(x_zero_point),
              "c3": np.array(3.0, np.float32), "c_cubic": np.array(0.044715, np.float32),
              "c_tanh": np.array(0.7978845608, np.float32), "one": np.array(1.0, np.float32),
              "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Identity", ["pixel_values"], ["x"]),
             helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd_f"])]
    outputs = []

    def out(name, dims=(1, 6, n)):
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims)))

    for tag, tail, zero, axis, _ in PROJECTIONS:
        consts[f"w{tag}"] = rng.integers(-127, 128, (k, n)).astype(np.int8)  # 2 KB: external
        consts[f"wz{tag}"] = np.full(k if axis == 0 else n, zero, np.int8)
        consts[f"ws{tag}"] = rng.uniform(1e-3, 1e-2, k if axis == 0 else n).astype(np.float32)
        consts[f"b{tag}"] = rng.standard_normal(1 if tail == "add1" else n).astype(np.float32)
        xd = "xd_f" if tag.startswith("f") else f"xd{tag}"
        if not tag.startswith("f"):
            nodes.append(helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], [xd]))
        m, y = f"m{tag}", f"y{tag}"
        nodes += [helper.make_node("DequantizeLinear", [f"w{tag}", f"ws{tag}", f"wz{tag}"],
                                   [f"wd{tag}"], axis=axis),
                  helper.make_node("MatMul", [xd, f"wd{tag}"], [m])]
        if tail in ("add", "add1", "add_seen"):
            nodes.append(helper.make_node("Add", [m, f"b{tag}"], [y]))
            if tail == "add_seen":
                out(m)
        elif tail == "fast_gelu":
            nodes.append(helper.make_node("FastGelu", [m, f"b{tag}"], [y],
                                          domain="com.microsoft"))
        elif tail == "tanh_gelu":  # gelu(m + b, approximate="tanh") as torch.onnx writes it
            v = f"v{tag}"
            nodes += [helper.make_node("Add", [m, f"b{tag}"], [v]),
                      helper.make_node("Pow", [v, "c3"], [f"p{tag}"]),
                      helper.make_node("Mul", [f"p{tag}", "c_cubic"], [f"pc{tag}"]),
                      helper.make_node("Add", [v, f"pc{tag}"], [f"in{tag}"]),
                      helper.make_node("Mul", [f"in{tag}", "c_tanh"], [f"it{tag}"]),
                      helper.make_node("Tanh", [f"it{tag}"], [f"t{tag}"]),
                      helper.make_node("Add", [f"t{tag}", "one"], [f"t1{tag}"]),
                      helper.make_node("Mul", [f"t1{tag}", "half"], [f"th{tag}"]),
                      helper.make_node("Mul", [f"th{tag}", v], [y])]
        else:
            nodes.append(helper.make_node("Identity", [m], [y]))
        out(y)
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                                     [1, 6, k])], outputs,
        [numpy_helper.from_array(v, name) for name, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


@pytest.mark.parametrize("zero_point", [np.int8(0), np.int8(-5), np.uint8(128)])
def test_biased_int8_projections_become_matmul_integer_to_float(tmp_path, zero_point):
    """On a QDQ graph, a biased int8 projection (a bias Add, FastGelu's bias, or
    the bias of a tanh GELU fused in the same call) becomes one
    MatMulIntegerToFloat that adds the bias, with uint8 activations (an int8 x
    requantized at zero point + 128: the same integers); asymmetric weights,
    bias-free projections, a shared DequantizeLinear of x, per-row weight
    scales, a broadcast bias and a MatMul output the graph also returns are
    left as they are; every output equals the QDQ graph's."""
    import onnxruntime as ort

    from vlmedge.export import vision_fusion
    path = tmp_path / "vision.onnx"
    _qdq_projections(path, zero_point)
    x = np.random.default_rng(1).standard_normal((1, 6, 64)).astype(np.float32) * 3
    want = ort.InferenceSession(str(path)).run(None, {"pixel_values": x})
    lines = []
    assert vision_fusion.fuse(path, lines.append, quantized=True), lines
    assert "1 tanh GELUs as FastGelu, 3 biased int8 projections as MatMulIntegerToFloat" \
        in lines[0], lines
    graph = onnx.load(str(path)).graph
    integer = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    rewritten = {t for t, *_, yes in PROJECTIONS if yes}
    assert sorted(n.input[6] for n in integer) == sorted(f"b{t}" for t in rewritten)
    kept = sorted(n.output[0] for n in graph.node if n.op_type == "MatMul")
    assert kept == sorted(f"m{t}" for t, *_, yes in PROJECTIONS if not yes)
    gelus = [n for n in graph.node if n.op_type == "FastGelu"]
    assert sorted(list(n.input) for n in gelus) == [["mb"], ["me"]]  # biases in the GEMMs
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    feeds = {n.input[0] for n in integer}
    assert len(feeds) == 1  # one uint8 copy of x for every rewritten projection
    if zero_point.dtype == np.uint8:
        assert feeds == {"xq"} and len(quantizers) == 1
    else:  # x requantized as uint8 beside the int8 one (which the kept projections read)
        assert len(quantizers) == 2
    got = ort.InferenceSession(str(path)).run(None, {"pixel_values": x})
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_the_integer_rewrite_alone_is_held_to_a_relative_bound():
    """The projection rewrite alone changes no integer, so it is held within
    INTEGER_TOLERANCE relative: one layer's bias left out of the demo's int8
    tower measured 3e-3 relative at cosine 0.99999, which the quantized graphs'
    cosine bound would pass."""
    from vlmedge.export import vision_fusion
    dropped = (3e-3, 0.99999)
    exact = vision_fusion.Agreement(quantized=True, exact=True)
    loose = vision_fusion.Agreement(quantized=True)
    exact.figures = loose.figures = dropped
    assert loose.ok and not exact.ok
    exact.figures = (0.0, 1.0)
    assert exact.ok and "integer rewrite" in str(exact)


def test_ort_answers_equal_portable_and_torch(ort_fp32, demo_artifact):
    """Greedy answers of the ort flavour equal the portable artifact's, token for token,
    and the first-step logits agree to fp32 rounding."""
    ort_s, port_s = _session(ort_fp32[0]), _session(demo_artifact)
    for img in _images():
        for q in QUESTIONS:
            a = ort_s.generate(img, q, max_new_tokens=12)
            b = port_s.generate(img, q, max_new_tokens=12)
            assert a.token_ids == b.token_ids, (q, a.text, b.text)
        enc_a, enc_b = ort_s.encode(img), port_s.encode(img)
        ids = ort_s.chat.prompt_ids(QUESTIONS[0], image_grid=enc_a.grid)
        la, _ = ort_s.prefill(ids, enc_a.features, ort_s.empty_cache())
        lb, _ = port_s.prefill(ids, enc_b.features, port_s.empty_cache())
        assert np.abs(la - lb).max() < 1e-4


def test_shared_buffer_extends_in_place_and_old_caches_stay_valid(ort_fp32):
    s = _session(ort_fp32[0])
    img = _images(1)[0]
    enc = s.encode(img)
    ids = s.chat.prompt_ids(QUESTIONS[0], image_grid=enc.grid)
    logits0, prefix = s.prefill(ids, enc.features, s.empty_cache())
    buf = prefix.buffer
    pointer = buf.arrays[0].ctypes.data
    binding = buf.binding  # the KV buffers bound once, as past and present
    assert binding is not None and binding[0] is s.decoder.session
    cache = prefix
    first = []
    for _ in range(5):  # decode steps write into the same buffer: no copy per step
        tok = int(np.argmax(logits0 if not first else first[-1][0]))
        lg, cache = s.step(s.embed_token(tok), cache)
        first.append((lg, tok))
        assert cache.buffer is buf and buf.arrays[0].ctypes.data == pointer
        assert buf.binding is binding  # and no rebinding of the layers' buffers
    assert cache.length == prefix.length + 5 and buf.frontier == cache.length
    # a second continuation from the old prefix forks: the first one's rows survive
    tok = first[0][1]
    lg_again, fork = s.step(s.embed_token(tok), prefix)
    assert fork.buffer is not buf and fork.buffer.capacity == buf.capacity  # same room
    assert fork.buffer.binding is not binding  # its own buffers, its own binding
    np.testing.assert_allclose(lg_again, first[0][0], atol=1e-5)
    # and the first continuation still continues exactly as a fresh recompute says
    more, _ = s.step(s.embed_token(3), cache)
    seq = ids + [t for _, t in first] + [3]
    ref, _ = s.prefill(seq, enc.features, s.empty_cache())
    np.testing.assert_allclose(more, ref, atol=1e-4)


def test_ask_and_long_answers_match_portable(ort_fp32, demo_artifact):
    """ask() seeds several answers from one prefix (forks), and a forced 200-token answer
    grows the buffer past its first capacity; both equal the portable flavour."""
    ort_s, port_s = _session(ort_fp32[0]), _session(demo_artifact)
    img = _images(1)[0]
    assert [r.text for r in ort_s.ask(img, QUESTIONS)] == \
        [r.text for r in port_s.ask(img, QUESTIONS)]
    from vlmedge.runtime.decoders import HEADROOM
    n = 200
    a = list(_forced(ort_s, img, n))
    b = list(_forced(port_s, img, n))
    assert len(a) == n and a == b
    assert n > HEADROOM


def test_step_logits_are_new_arrays_and_a_forced_length_leaves_the_prefills(ort_fp32):
    """The builder's pruned LM head takes the direct logits binding; every step
    returns an array of its own, so the decode loop may mask a forced length's
    stop tokens in place, and never in a prefill's logits (a cached prefix's)."""
    s = _session(ort_fp32[0])
    assert s._runner._logits_layout(s.decoder.session) is not None
    img = _images(1)[0]
    enc = s.encode(img)
    ids = s.chat.prompt_ids(QUESTIONS[0], image_grid=enc.grid)
    logits, cache = s.prefill(ids, enc.features, s.empty_cache())
    kept = logits.copy()
    a, cache_a = s.step(s.embed_token(5), cache)
    b, _ = s.step(s.embed_token(7), cache_a)
    assert not np.shares_memory(a, b) and not np.shares_memory(a, logits)
    timings = {}
    tokens = list(s.decode(logits, cache, 6, force_length=True, timings=timings))
    assert len(tokens) == 6 and not set(tokens) & set(s.chat.stop_token_ids)
    np.testing.assert_array_equal(logits, kept)  # the prefill's logits untouched
    # and the same answer as an unforced decode up to its first stop token
    free = list(s.decode(logits, cache, 6))
    assert tokens[:len(free)] == free


def _forced(s, img, n):
    enc = s.encode(img)
    ids = s.chat.prompt_ids("describe the image.", image_grid=enc.grid)
    logits, cache = s.prefill(ids, enc.features, s.empty_cache())
    return s.decode(logits, cache, n, force_length=True)


def test_int4_weight_only_export(ort_int4, ort_fp32):
    art, summary, lines = ort_int4
    m = manifest.load(art)
    assert m.precision == "int4" and m.decoder.flavour == "ort"
    assert m.components["decoder"].precision == "int4-weight-only"
    assert m.components["embed"].precision == "int8-weight-only"
    assert m.components["vision"].precision == "fp32"
    ops, _ = _ops(art / "decoder.onnx")
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    q = m.quantization.report
    assert q["method"] == "weight-only" and q["accuracy"]["passed"]
    fp32_decoder = (ort_fp32[0] / "decoder.onnx.data").stat().st_size
    assert (art / "decoder.onnx.data").stat().st_size < 0.3 * fp32_decoder
    final = q["accuracy"]["final"]
    # the demo model is trained: 4-bit weights keep its answers (gate: <= 1 point drop)
    assert final["scene_accuracy"] >= final["scene_accuracy_fp32"] - 0.01
    assert final["agreement"] >= 0.97
    assert summary["validation"]["passed"]  # the fp32 graphs' parity, before the weights
    r = _session(art).generate(_images(1)[0], "how many shapes are there?", max_new_tokens=4)
    assert r.text and r.timings["new_tokens"] >= 1


def test_ort_int8_weight_only_export(tmp_path):
    """--decoder-flavour ort --precision int8: MatMulNBits at 8 bits, gated, and
    the manifest says int8 where it names the weights."""
    art = tmp_path / "demo-ort-int8"
    _export(art, decoder_flavour="ort", precision="int8", calib="synthetic", calib_size=8)
    m = manifest.load(art)
    assert m.precision == "int8" and m.decoder.flavour == "ort"
    assert m.components["decoder"].precision == "int8-weight-only"
    q = m.quantization.report
    assert q["weights"].startswith("decoder MatMuls and LM head int8;"), q["weights"]
    assert "8-bit" in q["format"] and q["accuracy"]["passed"]
    from onnx import helper
    g = onnx.load(str(art / "decoder.onnx"), load_external_data=False).graph
    bits = {helper.get_attribute_value(a) for n in g.node if n.op_type == "MatMulNBits"
            for a in n.attribute if a.name == "bits"}
    assert bits == {8}


def test_portable_int4_is_standard_onnx_that_onnxruntime_fuses(tmp_path, ort_int4):
    """--precision int4 --decoder-flavour portable: every constant-weight MatMul
    behind an opset-21 DequantizeLinear of int4 blocks of 32 (standard ONNX, no
    contrib op in the file), which onnxruntime's CPU provider fuses into
    MatMulNBits at load; gated like the ort flavour's int4, and a quarter of the
    fp32 decoder's size."""
    import onnxruntime as ort

    art = tmp_path / "demo-portable-int4"
    summary, lines = _export(art, precision="int4", decoder_flavour="portable",
                             calib="synthetic", calib_size=8)
    m = manifest.load(art)
    assert m.precision == "int4" and m.decoder.flavour == "portable"
    assert m.components["decoder"].precision == "int4-weight-only"
    graph = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    assert {d.domain for d in graph.opset_import} <= {"", "ai.onnx"}  # no contrib ops
    assert max(d.version for d in graph.opset_import if d.domain in ("", "ai.onnx")) >= 21
    dqs = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    weights = {i.name: i for i in graph.graph.initializer}
    assert len(dqs) >= 2 * m.decoder.num_layers + 1  # per layer q/k/v/o + MLP, and the head
    for n in dqs:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs.get("block_size") == 32 and attrs.get("axis", 1) == 0
        assert weights[n.input[0]].data_type == onnx.TensorProto.INT4
    assert "MatMulNBits" not in {n.op_type for n in graph.graph.node}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(art / "decoder.onnx"), so, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"),
                                           load_external_data=False).graph.node}
    assert "MatMulNBits" in fused and "DequantizeLinear" not in fused
    q = m.quantization.report
    assert q["accuracy"]["passed"] and "DequantizeLinear" in q["format"]
    final = q["accuracy"]["final"]
    assert final["scene_accuracy"] >= final["scene_accuracy_fp32"] - 0.01
    assert final["agreement"] >= 0.97
    assert q["size"]["ratio"] < 0.3
    assert any("[int4]" in line and "int4 blocks of 32" in line for line in lines)
    # vlm-bench's roofline counts the int4 weights at half a byte (bytes read per token)
    from vlmedge.benchmarks.bench import roofline
    got = roofline.initializer_bytes(art / "decoder.onnx")
    data = m.files["decoder.onnx.data"].bytes
    assert data <= got < data + m.files["decoder.onnx"].bytes
    s = _session(art)
    for image in _images(2):
        assert s.generate(image, "what color is the circle?", max_new_tokens=4).text


def test_int4_block_size_128_in_both_flavours(tmp_path, ort_int4):
    """--weight-block-size 128: both decoders' int4 weights in blocks of 128 (one
    fp32 scale per 128 weights, not 32: fewer bytes a step reads), recorded in
    the manifest, each flavour gated against its own fp32 graph."""
    art = tmp_path / "demo-both-int4-b128"
    summary, lines = _export(art, precision="int4", decoder_flavour="both",
                             weight_block_size=128, calib="synthetic", calib_size=8)
    m = manifest.load(art)
    ort_graph = onnx.load(str(art / "decoder_ort.onnx"), load_external_data=False)
    nbits = [n for n in ort_graph.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}["block_size"] == 128
                         for n in nbits)
    portable = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    dqs = [n for n in portable.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all({a.name: a.i for a in n.attribute}["block_size"] == 128 for n in dqs)
    q = m.quantization.report
    assert q["block_size"] == 128 and "blocks of 128" in q["format"] and "block 128" in q["format"]
    assert q["accuracy"]["passed"]
    for fig in q["accuracy"]["by_flavour"].values():
        assert fig["agreement"] >= 0.97
        assert fig["scene_accuracy"] >= fig["scene_accuracy_fp32"] - 0.01
    # each output row's weights: ceil(K / 128) blocks of 64 bytes (the demo's K of
    # 192 and 512 pad to whole blocks), one scale per block
    init = {i.name: list(i.dims) for i in ort_graph.graph.initializer}
    for n in nbits:
        k = {a.name: a.i for a in n.attribute}["K"]
        assert init[n.input[1]][1:] == [-(-k // 128), 64]
    assert any("int4 blocks of 128" in line for line in lines)
    from vlmedge.benchmarks.bench.systems import artifact_specs
    assert [spec.name for spec in artifact_specs([art])] == ["onnx-int4-b128", "ort-int4-b128"]
    for flavour in ("ort", "portable"):
        r = _session(art, decoder_flavour=flavour).generate(
            _images(1)[0], "how many shapes are there?", max_new_tokens=4)
        assert r.text


def test_int4_with_int8_vision(tmp_path, ort_int4, monkeypatch):
    """--vision-precision int8: the vision graph through the INT8 stage alone (static QDQ),
    the decoder's int4 weights kept; the whole artifact gated against fp32. Its
    MLPs then run in pieces of 5 of the demo's 17 patches (export/vision_chunks.py;
    256 by default), and the manifest holds the cut graph's hash."""
    from vlmedge.export import vision_chunks
    monkeypatch.setattr(vision_chunks, "PIECE_ROWS", 5)
    art = tmp_path / "demo-int4-v8"
    summary, lines = _export(art, precision="int4", vision_precision="int8", calib="synthetic",
                             calib_size=8, calib_cache="off")
    m = manifest.load(art)
    assert m.precision == "int4" and m.decoder.flavour == "ort"
    assert m.components["vision"].precision == "int8"
    assert m.components["decoder"].precision == "int4-weight-only"
    vops, _ = _ops(art / "vision.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= vops
    # the QDQ graph's biased projections then take their bias into the GEMM
    assert "vision-fusion (quantized)" in summary["stages"]
    graph = onnx.load(str(art / "vision.onnx"), load_external_data=False).graph
    integer = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(integer) >= 4 and all(len(n.input) == 7 and n.input[6] for n in integer)
    # every projection of the demo's tower and projector has a bias: none is left
    assert "MatMul" not in {n.op_type for n in graph.node}
    assert any("biased int8 projections as MatMulIntegerToFloat" in x for x in lines), lines
    # 4 tower MLPs and the projector's, each in 4 pieces: fc1 and fc2 in every one
    assert "vision-pieces" in summary["stages"]
    assert [n.op_type for n in graph.node].count("Split") == 5 and len(integer) >= 40
    assert any(x.startswith("[vision-pieces] the MLPs of vision.onnx run in pieces: 5 in 4 "
                            "pieces of <= 5 of their 17 rows") for x in lines), lines
    q = m.quantization.report
    assert q["vision"]["accuracy"]["passed"] and q["accuracy"]["passed"]
    final = q["accuracy"]["final"]
    assert final["cosine_mean"] >= 0.99  # int8 vision against the fp32 features
    assert final["scene_accuracy"] >= final["scene_accuracy_fp32"] - 0.01
    assert (art / "vision.onnx.data").stat().st_size < \
        0.5 * (ort_int4[0] / "vision.onnx.data").stat().st_size
    r = _session(art).generate(_images(1)[0], "how many shapes are there?", max_new_tokens=4)
    assert r.text


def test_int4_gptq_is_calibrated_and_gated(tmp_path, ort_int4):
    """--weight-method gptq: the same MatMulNBits format from the fp32 graph, its
    rounding fitted on the calibration prompts (so its weights differ from RTN's),
    the same gate."""
    art = tmp_path / "demo-int4-gptq"
    _export(art, precision="int4", weight_method="gptq", calib="synthetic", calib_size=8)
    m = manifest.load(art)
    q = m.quantization.report
    assert q["weight_method"] == "gptq" and "GPTQ" in q["format"] and q["accuracy"]["passed"]
    ops, _ = _ops(art / "decoder.onnx")
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops and "MatMul" not in ops
    rtn = (ort_int4[0] / "decoder.onnx.data").read_bytes()
    gptq = (art / "decoder.onnx.data").read_bytes()
    assert gptq != rtn and len(gptq) < 1.2 * len(rtn)
    final = q["accuracy"]["final"]
    assert final["scene_accuracy"] >= final["scene_accuracy_fp32"] - 0.01
    r = _session(art).generate(_images(1)[0], "how many shapes are there?", max_new_tokens=4)
    assert r.text


def test_vision_mlps_in_pieces_answer_as_whole(ort_fp32, tmp_path, monkeypatch):
    """An fp32 ort export whose tower MLPs run in pieces of 4 of the demo's 17
    patches: validated against PyTorch, its manifest verified on load, and its
    answers token for token those of the whole graph's artifact (ort_fp32:
    17 patches are within the default 256, so it is kept whole)."""
    from vlmedge.export import vision_chunks
    assert "Split" not in _ops(ort_fp32[0] / "vision.onnx")[0]
    monkeypatch.setattr(vision_chunks, "PIECE_ROWS", 4)
    art = tmp_path / "demo-ort-pieces"
    summary, lines = _export(art, decoder_flavour="ort")
    assert "vision-pieces" in summary["stages"] and summary["validation"]["passed"]
    assert any("run in pieces: 5 in 5 pieces of <= 4 of their 17 rows" in x for x in lines), \
        lines
    ops = [n.op_type for n in onnx.load(str(art / "vision.onnx"),
                                        load_external_data=False).graph.node]
    assert ops.count("Split") == 5
    whole, cut = _session(ort_fp32[0]), _session(art)  # verify=True: hashes checked
    for image, q in zip(_images(3), QUESTIONS):
        np.testing.assert_array_equal(cut.encode(image).features, whole.encode(image).features)
        assert cut.generate(image, q, max_new_tokens=12).token_ids == \
            whole.generate(image, q, max_new_tokens=12).token_ids


def test_ort_flavour_runtime_needs_no_torch(ort_int4):
    art = ort_int4[0]
    code = PRELUDE + f"""
from vlmedge.runtime import VLMSession
from vlmedge.demo import scenes
s = VLMSession({str(art)!r}, provider="cpu")
r = s.generate(scenes.make_scene(5).image, "how many shapes are there?", max_new_tokens=4)
assert r.text, r
assert "torch" not in sys.modules and "onnxruntime_genai" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("kw, words", [
    (dict(decoder_flavour="ort", target="trt", precision="fp16"), "--target trt needs"),
    (dict(decoder_flavour="portable", precision="int4", target="trt"),
     "--target trt takes --precision fp16, int8 or int4-fp16"),
    (dict(decoder_flavour="portable", precision="int4", weight_method="gptq"),
     "--weight-method gptq applies"),
    (dict(decoder_flavour="ort", precision="fp16"), "takes --precision"),
    (dict(decoder_flavour="fast"), "unknown --decoder-flavour"),
    (dict(vision_precision="int8"), "--vision-precision applies"),
    (dict(precision="int4", vision_precision="int4"), "unknown --vision-precision"),
    (dict(weight_method="gptq"), "--weight-method gptq applies"),
    (dict(precision="int4", weight_method="awq"), "unknown --weight-method"),
    (dict(precision="int4", weight_block_size=48), "--weight-block-size must be a power"),
    (dict(precision="int4", weight_block_size=512), "--weight-block-size must be a power"),
    (dict(precision="int4", weight_block_size=True), "--weight-block-size must be a power"),
    (dict(weight_block_size=128), "--weight-block-size applies to weight-only"),
    (dict(precision="int8", weight_block_size=128), "--weight-block-size applies"),
])
def test_bad_flavour_options_are_one_line(kw, words, tmp_path):
    with pytest.raises(UserInputError, match=words):
        exporter.check_options(exporter.ExportOptions(model_dir=Path("."),
                                                      output=tmp_path / "x", **kw))


def test_builder_runs_in_a_child_process(tmp_path):
    """onnxruntime-genai's builder loads the language model again and kept that
    memory in the exporter: it runs in a child, so the exporting process never
    imports it (checked in a fresh interpreter), and a builder failure is one
    line naming what it said."""
    from vlmedge.export import ort_decoder
    code = f"""
import sys
from pathlib import Path
from vlmedge.export import exporter
from vlmedge.models import demo_model_dir
exporter.run_export(exporter.ExportOptions(model_dir=demo_model_dir(), decoder_flavour="ort",
                    output=Path({str(tmp_path / "art")!r}), validate=False),
                    log=lambda line: None)
print("builder imported:", "onnxruntime_genai.models.builder" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "builder imported: False" in out.stdout
    assert (tmp_path / "art" / "decoder.onnx").is_file()
    with pytest.raises(UnsupportedArchitectureError, match="model builder failed") as e:
        ort_decoder._run_builder([None, str(tmp_path / "no-model"), str(tmp_path / "o"), "fp32",
                                  "cpu", str(tmp_path / "c")], [])
    assert "\n" not in str(e.value)


def test_mrope_family_refused_for_ort_flavour(tmp_path):
    from test_families import build_qwen2_vl
    src = build_qwen2_vl(tmp_path / "qwen")
    with pytest.raises(UnsupportedArchitectureError, match="mrope"):
        _export(tmp_path / "out", model_dir=src, decoder_flavour="ort")
    assert not (tmp_path / "out").exists()


def test_dynamic_rope_goes_to_the_builder_as_the_default_rope():
    """onnxruntime-genai's builder refuses "dynamic" NTK rope (InternVL3's Qwen2.5):
    the text model it reads gets the default rope with the same theta, which is
    the same rope below max_position_embeddings, all an artifact serves. Other
    rope settings pass unchanged."""
    import transformers

    from vlmedge.export.ort_decoder import _plain_dynamic_rope
    dynamic = transformers.Qwen2Config(
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    _plain_dynamic_rope(dynamic)
    assert dynamic.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    linear = transformers.LlamaConfig(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    _plain_dynamic_rope(linear)
    assert linear.rope_parameters["rope_type"] == "linear"
    assert linear.rope_parameters["factor"] == 2.0


def test_head_size_gqa_cannot_take_is_refused(tiny_llava_dir, tmp_path):
    """onnxruntime's GroupQueryAttention needs head sizes in multiples of 16; the tiny
    LLaVA's are 8: refused in one line before anything is exported."""
    with pytest.raises(UnsupportedArchitectureError, match="head size"):
        _export(tmp_path / "out", model_dir=tiny_llava_dir, decoder_flavour="ort")
    assert not (tmp_path / "out").exists()


def test_manifest_flavour_is_strict(ort_fp32, tmp_path):
    d = json.loads((ort_fp32[0] / "manifest.json").read_text())
    bad = json.loads(json.dumps(d))
    bad["decoder"]["flavour"] = "fast"
    with pytest.raises(ArtifactError, match="decoder.flavour"):
        manifest.Manifest.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["target"] = "trt"
    with pytest.raises(ArtifactError, match="decoder.flavour"):
        manifest.Manifest.from_dict(bad)
    old = json.loads(json.dumps(d))
    del old["decoder"]["flavour"]  # manifests written before flavours: portable
    assert manifest.Manifest.from_dict(old).decoder.flavour == "portable"
