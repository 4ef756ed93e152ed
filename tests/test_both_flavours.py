"""Both decoder flavours in one artifact (--decoder-flavour both): the portable
graph as component "decoder" and the onnxruntime-native one as "decoder_ort",
each validated against PyTorch and (int4) gated on its own, the ort one beside
its own fused vision graph "vision_ort" reading the weights of the standard
"vision" (fp32 and int8); the runtime picks
ort on onnxruntime's CPU and CUDA providers and portable elsewhere, or the
caller's; vlm-run and vlm-bench say and choose which; the manifest's
cross-checks and the export's refusals are one line each."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime_genai")

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import ArtifactError, UserInputError  # noqa: E402
from vlmedge.export import exporter  # noqa: E402
from vlmedge.models import demo_model_dir  # noqa: E402
from vlmedge.onnx_refs import external_data_locations  # noqa: E402
from vlmedge.runtime import VLMSession  # noqa: E402
from vlmedge.runtime.decoders import pick_flavour  # noqa: E402

BIN = Path(sys.executable).parent


def _export(out, **kw):
    lines = []
    summary = exporter.run_export(exporter.ExportOptions(
        model_dir=demo_model_dir(), output=out, decoder_flavour="both", **kw),
        log=lines.append)
    return summary, lines


@pytest.fixture(scope="module")
def both_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("both") / "demo-both-fp32"
    return (out, *_export(out))


@pytest.fixture(scope="module")
def both_int4(tmp_path_factory):
    out = tmp_path_factory.mktemp("both4") / "demo-both-int4"
    return (out, *_export(out, precision="int4", calib="synthetic", calib_size=8))


@pytest.fixture(scope="module")
def both_int4_vint8(tmp_path_factory):
    """Its ort vision graph's MLPs in pieces of 5 of the demo's 17 patches
    (export/vision_chunks.py; 256 by default, which the demo is within)."""
    from vlmedge.export import vision_chunks
    out = tmp_path_factory.mktemp("both4v8") / "demo-both-int4-vint8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vision_chunks, "PIECE_ROWS", 5)
        return (out, *_export(out, precision="int4", vision_precision="int8",
                              calib="synthetic", calib_size=8, validate=False))


def _ops(path):
    m = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in m.graph.node}, [i.name for i in m.graph.input]


def _session(art, **kw):
    return VLMSession(art, provider="cpu", threads=1, **kw)


def _scene():
    return scenes.make_scene(scenes.EVAL_SEED_BASE + 17)


# -- the artifact --------------------------------------------------------------------

def test_one_artifact_holds_both_decoders_each_validated(both_fp32):
    art, summary, lines = both_fp32
    m = manifest.load(art)
    assert m.decoder.flavour == "portable" and m.decoder_flavours == ("portable", "ort")
    assert summary["decoder_flavours"] == ["portable", "ort"]
    assert {"decoder.onnx", "decoder_ort.onnx", "decoder_ort.onnx.data"} <= set(m.files)
    assert m.components["decoder_ort"].file == "decoder_ort.onnx"
    # the portable decoder may run on TensorRT, so its vision graph stays standard
    vision_ops, _ = _ops(art / "vision.onnx")
    assert "Softmax" in vision_ops and "MultiHeadAttention" not in vision_ops
    port_ops, port_in = _ops(art / "decoder.onnx")
    ort_ops, ort_in = _ops(art / "decoder_ort.onnx")
    assert "position_ids" in port_in and "GroupQueryAttention" not in port_ops
    assert "GroupQueryAttention" in ort_ops and "position_ids" not in ort_in
    v = m.validation
    assert set(v["flavours"]) == {"portable", "ort"}
    for flavour, rec in v["flavours"].items():
        assert rec["decoder_flavour"] == flavour
        assert rec["passed"] and rec["tokens_match"] and rec["max_abs_diff_logits"] < 1e-4
    assert v["passed"] and v["max_abs_diff_logits"] == max(
        r["max_abs_diff_logits"] for r in v["flavours"].values())
    assert any("decoder-ort" in line for line in lines)


def _features(session, image):
    return session.encode(image).features


def _shares_vision_weights(art: Path, m) -> None:
    """vision_ort: its own small graph file, the weights file of "vision"."""
    twin = m.components["vision_ort"]
    assert twin.file == "vision_ort.onnx" and twin.data_file == "vision.onnx.data"
    assert twin.precision == m.components["vision"].precision
    assert twin.inputs == m.components["vision"].inputs
    assert not (art / "vision_ort.onnx.data").exists() and "vision_ort.onnx.data" not in m.files
    assert external_data_locations((art / "vision_ort.onnx").read_bytes()) == {"vision.onnx.data"}
    # fewer nodes than vision.onnx, the same inline constants, no weights of its own
    assert m.files["vision_ort.onnx"].bytes <= m.files["vision.onnx"].bytes
    ops, _ = _ops(art / "vision_ort.onnx")
    assert "MultiHeadAttention" in ops and "Softmax" not in ops


def test_the_ort_decoder_runs_a_fused_vision_graph_on_the_same_weights(both_fp32):
    """The ort flavour's vision graph has onnxruntime's fused attention, and
    reads vision.onnx.data (no second copy of the tower's weights); the
    portable flavour runs the standard graph; the features are the same."""
    art, summary, lines = both_fp32
    m = manifest.load(art)
    _shares_vision_weights(art, m)
    assert any("[vision-fusion]" in x and "as vision_ort.onnx beside it" in x for x in lines)
    ort, port = _session(art), _session(art, decoder_flavour="portable")
    assert ort.vision.path.name == "vision_ort.onnx" and port.vision.path.name == "vision.onnx"
    image = _scene().image
    a, b = _features(ort, image), _features(port, image)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()


def test_the_fused_vision_graph_follows_the_int8_vision_weights(both_int4_vint8):
    """With an int8 vision graph the fusion is proven on the fp32 weights, then
    made again on the QDQ graph after quantization (its attention cores stay
    fp32, the same pattern), reading the int8 weights file; its features agree
    with the standard int8 graph's at the int8 gate's cosine."""
    art, summary, lines = both_int4_vint8
    m = manifest.load(art)
    assert m.components["vision"].precision == "int8"
    _shares_vision_weights(art, m)
    fused_ops = _ops(art / "vision_ort.onnx")[0]
    assert {"DequantizeLinear", "MatMulIntegerToFloat"} <= fused_ops  # biases in the GEMMs
    assert "MatMul" not in fused_ops  # every projection of the demo's tower is biased
    assert "vision-fusion (quantized)" in summary["stages"]
    assert any("proof on the fp32 weights" in x for x in lines)
    # the ort graph alone runs its MLPs in pieces; the portable one (TensorRT's) is whole
    assert any(x.startswith("[vision-pieces] the MLPs of vision_ort.onnx run in pieces: 5 in 4 "
                            "pieces") for x in lines), lines
    assert "Split" in fused_ops and "Split" not in _ops(art / "vision.onnx")[0]
    ort, port = _session(art), _session(art, decoder_flavour="portable")  # hashes verified
    assert ort.vision.path.name == "vision_ort.onnx"
    for seed in (1, 2):
        image = scenes.make_scene(scenes.EVAL_SEED_BASE + seed).image
        a, b = (f.astype(np.float64) for f in (_features(ort, image), _features(port, image)))
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.mean() >= 0.99, cos


def test_vlm_eval_names_each_flavour_as_vlm_bench_does(both_int4_vint8):
    """One name per system in both tools' reports (block and int8 vision
    included), so a report can join the two."""
    from vlmedge.benchmarks.bench.systems import artifact_specs
    from vlmedge.benchmarks.runtime_answerer import RuntimeAnswerer
    art = both_int4_vint8[0]
    bench = {s.decoder_flavour: s.name for s in artifact_specs([art])}
    assert bench == {"portable": "onnx-int4-vint8", "ort": "ort-int4-vint8"}
    for flavour, name in bench.items():
        assert RuntimeAnswerer(art, threads=1, decoder_flavour=flavour).system_name == name


def test_a_fused_graph_that_disagrees_is_not_written(both_int4_vint8, tmp_path, monkeypatch):
    """Held to a bound it cannot meet, the fused graph is not written and the
    log says why in one line (the artifact's ort flavour then runs "vision")."""
    import shutil

    from vlmedge.export import vision_fusion
    for name in ("vision.onnx", "vision.onnx.data"):
        shutil.copy(both_int4_vint8[0] / name, tmp_path / name)
    monkeypatch.setattr(vision_fusion, "QUANTIZED_COSINE", 1.000001)
    lines = []
    assert not vision_fusion.fuse(tmp_path / "vision.onnx", lines.append,
                                  beside="vision_ort.onnx", quantized=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert len(lines) == 1 and "not written" in lines[0] and "mean cosine" in lines[0]


def test_a_fused_graph_reading_weights_its_manifest_does_not_give_it_is_refused(
        both_fp32, tmp_path):
    """The graph's external data must be its component's listed data file: a
    manifest that takes vision.onnx.data away from vision_ort fails to open,
    in one line, before onnxruntime reads anything."""
    import shutil
    art = tmp_path / "art"
    shutil.copytree(both_fp32[0], art)
    m = manifest.read_json(art)
    m["components"]["vision_ort"]["data_file"] = None
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="vision_ort.onnx reads external data") as e:
        _session(art, verify=False)
    assert "\n" not in str(e.value)
    assert _session(art, verify=False, decoder_flavour="portable").vision.path.name == \
        "vision.onnx"


def test_session_picks_ort_on_the_cpu_and_portable_on_request(both_fp32):
    art = both_fp32[0]
    auto, port = _session(art), _session(art, decoder_flavour="portable")
    assert auto.decoder_flavour == "ort" and port.decoder_flavour == "portable"
    assert "position_ids" in port.decoder.input_names
    assert "position_ids" not in auto.decoder.input_names
    assert _session(art, decoder_flavour="ort").decoder_flavour == "ort"


def test_both_flavours_answer_alike_and_right(both_fp32):
    """Greedy answers of the two decoders of one artifact are the same tokens on
    24 held-out questions (every kind), and right about the scenes (the demo's
    accuracy: not merely each other's mistakes)."""
    art = both_fp32[0]
    ort, port = _session(art), _session(art, decoder_flavour="portable")
    right = 0
    items = scenes.eval_items(24, seed=3)
    for scene, q in items:
        a = ort.generate(scene.image, q.question, max_new_tokens=24)
        b = port.generate(scene.image, q.question, max_new_tokens=24)
        assert a.token_ids == b.token_ids, (q.question, a.text, b.text)
        right += scenes.is_right(q.kind, q.answer, a.text)
    assert right >= 0.9 * len(items)


@pytest.mark.parametrize("providers,want", [
    (["CPUExecutionProvider"], "ort"),
    # the ort graph is built for the CPU's kernels (fp32 activations; onnxruntime's CUDA
    # GroupQueryAttention takes fp16/bf16): CUDA runs the portable one unless asked
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "portable"),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "portable"),
    (["OpenVINOExecutionProvider", "CPUExecutionProvider"], "portable"),
    (["CoreMLExecutionProvider"], "portable")])
def test_the_provider_picks_the_flavour(both_fp32, providers, want):
    assert pick_flavour(manifest.load(both_fp32[0]), providers) == want


def test_an_absent_or_unknown_flavour_is_refused_in_one_line(both_fp32, demo_artifact):
    with pytest.raises(ArtifactError, match="no ort decoder") as e:
        _session(demo_artifact, decoder_flavour="ort")
    assert "\n" not in str(e.value) and "--decoder-flavour both" in str(e.value)
    with pytest.raises(UserInputError, match="unknown decoder flavour") as e:
        _session(both_fp32[0], decoder_flavour="fast")
    assert "\n" not in str(e.value) and "portable | ort" in str(e.value)
    # a portable-only artifact runs its one decoder on the CPU as before
    assert _session(demo_artifact).decoder_flavour == "portable"


@pytest.mark.parametrize("change,match", [
    (lambda m: m["decoder"].update(flavour="ort"), "decoder.flavour"),
    (lambda m: m.update(target="trt"), "components.decoder_ort"),
    (lambda m: m["components"]["decoder_ort"].update(file="elsewhere.onnx"), "decoder_ort"),
    (lambda m: m["components"].update(decoder_gpu=m["components"]["decoder"]), "decoder_gpu"),
    (lambda m: m["components"].pop("decoder_ort"), "components.vision_ort"),
    (lambda m: m["components"]["vision_ort"].update(data_file="nowhere.data"), "vision_ort")])
def test_manifest_cross_checks_the_second_decoder(both_fp32, change, match):
    m = manifest.read_json(both_fp32[0])
    change(m)
    with pytest.raises(ArtifactError, match=match) as e:
        manifest.Manifest.from_dict(m)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,words", [
    (dict(precision="int8"), "takes --precision fp32 | int4"),
    (dict(target="trt"), "--target trt takes --precision fp16, int8 or int4-fp16, not fp32"),
    (dict(precision="int4", weight_method="gptq"), "--decoder-flavour both"),
    (dict(vision_precision="int8"), "--decoder-flavour both"),
    (dict(precision="int8-dynamic"), "takes --precision fp32 | int4")])
def test_bad_both_options_are_one_line(kw, words, tmp_path):
    o = exporter.ExportOptions(model_dir=demo_model_dir(), output=tmp_path / "o",
                               decoder_flavour="both", **kw)
    with pytest.raises(UserInputError) as e:
        exporter.check_options(o)
    assert words in str(e.value) and "\n" not in str(e.value)


# -- int4: both decoders quantized and gated -----------------------------------------

def test_int4_quantizes_and_gates_each_decoder(both_int4, both_fp32):
    art, summary, lines = both_int4
    m = manifest.load(art)
    assert m.precision == "int4" and m.decoder_flavours == ("portable", "ort")
    for comp in ("decoder", "decoder_ort"):
        assert m.components[comp].precision == "int4-weight-only"
    port_ops, _ = _ops(art / "decoder.onnx")
    ort_ops, _ = _ops(art / "decoder_ort.onnx")
    assert "DequantizeLinear" in port_ops and "MatMulNBits" not in port_ops  # standard ONNX
    assert "MatMulNBits" in ort_ops
    q = m.quantization.report
    assert q["accuracy"]["passed"] and set(q["accuracy"]["by_flavour"]) == {"portable", "ort"}
    for flavour, fig in q["accuracy"]["by_flavour"].items():
        assert fig["agreement"] >= 0.97 and fig["positions"] > 100, (flavour, fig)
        size = q["size"]["by_flavour"][flavour]
        assert size["ratio"] < 0.3, (flavour, size)  # int4 weights, fp32 activations
    assert sum(f"int4] {f} decoder" in line for line in lines for f in ("portable", "ort")) == 2
    # fp32 vision stays as exported: its fused graph, made once, serves the ort decoder
    assert "vision_ort" in m.components and "vision-fusion (quantized)" not in summary["stages"]
    fp32_sizes = {n: e.bytes for n, e in manifest.load(both_fp32[0]).files.items()}
    assert m.files["decoder_ort.onnx.data"].bytes < 0.3 * fp32_sizes["decoder_ort.onnx.data"]


def test_int4_flavours_answer_the_scenes(both_int4):
    """Each int4 decoder answers held-out scene questions (every kind) as the
    fp32 demo does: at least 90% right (fp32 scores 0.99 on 500)."""
    items = scenes.eval_items(24, seed=4)
    for flavour in ("portable", "ort"):
        s = _session(both_int4[0], decoder_flavour=flavour)
        right = sum(scenes.is_right(q.kind, q.answer,
                                    s.generate(scene.image, q.question, max_new_tokens=24).text)
                    for scene, q in items)
        assert right >= 0.9 * len(items), (flavour, right)


# -- the tools -------------------------------------------------------------------------

def test_vlm_run_says_and_takes_the_flavour(both_fp32):
    art = both_fp32[0]
    out = {}
    for flavour in (None, "portable"):
        cmd = [str(BIN / "vlm-run"), str(art), "--provider", "cpu", "--json", "-n", "8",
               "--prompt", "what color is the circle?"]
        if flavour:
            cmd += ["--decoder-flavour", flavour]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-800:]
        res = json.loads(r.stdout)
        out[res["decoder_flavour"]] = res["text"]
    assert set(out) == {"ort", "portable"} and out["ort"] == out["portable"]
    r = subprocess.run([str(BIN / "vlm-run"), str(art), "--decoder-flavour", "trt"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("vlm-run: error")]
    assert len(errors) == 1 and "decoder flavour" in errors[0] and "'trt'" in errors[0]


def test_vlm_bench_runs_each_flavour_as_its_own_system(both_fp32, tmp_path):
    """One artifact, two systems side by side (onnx-fp32 = portable, ort-fp32),
    each counting only its own decoder's weights."""
    from vlmedge.benchmarks.bench import run as bench_run
    from vlmedge.benchmarks.bench.systems import artifact_specs

    specs = artifact_specs([both_fp32[0]])
    assert [(s.name, s.decoder_flavour) for s in specs] == [("onnx-fp32", "portable"),
                                                            ("ort-fp32", "ort")]
    total = {s.name: bench_run._weights(s) for s in specs}
    m = manifest.load(both_fp32[0])
    for s in specs:
        weights, decode = total[s.name]
        other = "decoder_ort" if s.decoder_flavour == "portable" else "decoder"
        on_disk = sum(e.bytes for e in m.files.values())
        assert weights < on_disk - 0.9 * m.files[f"{other}.onnx"].bytes - 0.9 * (
            m.files[f"{other}.onnx.data"].bytes if f"{other}.onnx.data" in m.files else 0)
        assert decode < weights
    image = tmp_path / "scene.png"
    _scene().image.save(image)
    out = tmp_path / "bench.json"
    r = subprocess.run([str(BIN / "vlm-bench"), str(both_fp32[0]), "--image", str(image),
                        "--runs", "1", "--warmup", "0", "--new-tokens", "4", "--threads", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-1500:]
    rep = json.loads(out.read_text())
    flavours = {s["name"]: s["decoder_flavour"] for s in rep["systems"]}
    assert flavours == {"onnx-fp32": "portable", "ort-fp32": "ort"}
    on_disk = sum(e.bytes for e in m.files.values())
    for s in rep["systems"]:  # each system's size: its own graphs' files, not the other's
        other = ["decoder_ort.onnx", "decoder_ort.onnx.data", "vision_ort.onnx"] \
            if s["decoder_flavour"] == "portable" else \
            ["decoder.onnx", "decoder.onnx.data", "vision.onnx"]  # vision.onnx.data: shared
        assert s["artifact_bytes"] == on_disk - sum(m.files[n].bytes for n in other
                                                    if n in m.files)
    assert all(np.isfinite(s["decode_tokens_per_s"]) for s in rep["systems"])


def test_vlm_eval_scores_each_flavour(both_fp32):
    """vlm-eval on one both-artifact: the ort decoder by default on the CPU,
    the portable one on request, named as vlm-bench names them, with the same
    answers (the two decoders agree token for token above)."""
    exe = str(BIN / "vlm-eval")
    out = {}
    for extra in ([], ["--decoder-flavour", "portable"]):
        r = subprocess.run([exe, str(both_fp32[0]), "--n", "12", "--seed", "5", "--json",
                            *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-800:]
        res = json.loads(r.stdout)
        out[res["system"]] = res
    assert set(out) == {"ort-fp32", "onnx-fp32"}
    assert out["ort-fp32"]["accuracy"] == out["onnx-fp32"]["accuracy"] >= 0.75
    r = subprocess.run([exe, "--model", "demo", "--decoder-flavour", "ort"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert [x for x in r.stderr.splitlines() if x.startswith("vlm-eval: error")][0].count(
        "--decoder-flavour") == 1
