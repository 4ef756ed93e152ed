"""TensorRT target (issue 6).

Here (no TensorRT): `vlm-export --target trt` prepares an artifact (profile
plan, static compatibility check, build_engines.sh) and says how to finish;
check-trt passes on every family's fp16 graphs and catches unsupported ones;
trtexec command lines; the runtime's preflight, engine hashing and KV-slot
pool; clear errors where TensorRT is missing; every --help without TensorRT.

Marked `trt` (skipped where tensorrt does not import): engines built through
the Python API, native-engine generation against onnxruntime, preflight and
tampering on real engines.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.errors import (ArtifactError, MissingDependencyError, TensorRTError,  # noqa: E402
                            UserInputError)
from vlmedge.export.trt import compat, profiles, trtexec  # noqa: E402

CONTEXT = 128  # a small --max-context keeps the plans readable


def _run(*args, timeout=900):
    exe = str(Path(sys.executable).parent / "vlm-export")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trt_llava(tiny_llava_dir, tmp_path_factory):
    """(artifact dir, CompletedProcess) of `vlm-export --target trt --precision fp16`."""
    out = tmp_path_factory.mktemp("trt") / "tiny-llava-trt-fp16"
    r = _run("--model", tiny_llava_dir, "--target", "trt", "--precision", "fp16", "--output", out,
             "--max-context", CONTEXT, "--max-images", 2)
    return out, r


@pytest.fixture(scope="module")
def trt_families(tmp_path_factory):
    """{family: artifact dir} of the other families exported --target trt fp16
    (tiny builders from test_families; validation off: onnxruntime's CPU
    provider lacks fp16 kernels for some of their ops)."""
    from test_families import BUILDERS

    from vlmedge.export import exporter

    root = tmp_path_factory.mktemp("trt_fams")
    out = {}
    for name, build in BUILDERS.items():
        src = build(root / f"src_{name}")
        art = root / f"tiny-{name}-trt-fp16"
        exporter.run_export(exporter.ExportOptions(
            model_dir=src, output=art, target="trt", precision="fp16", validate=False,
            max_context=CONTEXT), log=lambda s: None)
        out[name] = art
    return out


# -- export --target trt, without TensorRT -----------------------------------------

def test_export_prepares_artifact_and_says_how_to_finish(trt_llava):
    art, r = trt_llava
    assert r.returncode == 0, r.stderr
    finish = [line for line in r.stdout.splitlines() if "build-engines" in line]
    assert len(finish) == 1 and f"vlm-export build-engines {art}" in finish[0], r.stdout
    assert "Traceback" not in r.stderr
    m = manifest.load(art).to_dict()  # every file hashed, build_engines.sh included
    assert m["target"] == "trt" and m["precision"] == "fp16"
    assert "build_engines.sh" in m["files"]
    t = m["trt"]
    assert t["compat"]["passed"] and t["engines"] is None and t["tensorrt_version"] is None
    assert t["plan"]["max_context"] == CONTEXT and t["plan"]["max_images"] == 2
    assert [p["name"] for p in t["plan"]["components"]["decoder"]["profiles"]] == \
        ["prefill", "decode"]


def test_readme_trt_command_exports_the_demo(tmp_path):
    """The README's TensorRT section, first line: the trained demo's features
    reach ~80, where one fp16 step is 0.06; the export validates (tokens equal
    to PyTorch's, features within the fp16 bound at their scale)."""
    from vlmedge.export.validate import FP16_STEPS

    out = tmp_path / "demo-trt"
    r = _run("--model", "demo", "--target", "trt", "--precision", "fp16", "-o", out)
    assert r.returncode == 0, r.stderr[-2000:]
    v = manifest.load(out).to_dict()["validation"]
    assert v["passed"] and v["tokens_match"] and not v.get("skipped")
    scale, tol = v["image_features_scale"], v["tolerances"]["image_features"]
    assert scale > 32  # a trained tower's magnitudes, where fp16 steps exceed the absolute tol
    assert v["image_features_bound"] == pytest.approx(tol + FP16_STEPS * 2.0 ** -10 * scale)
    assert v["max_abs_diff_image_features"] <= v["image_features_bound"]


def test_build_script_is_exact_and_valid_bash(trt_llava):
    art, _ = trt_llava
    m = manifest.load(art).to_dict()
    script = (art / "build_engines.sh").read_text()
    assert (art / "build_engines.sh").stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(art / "build_engines.sh")]).returncode == 0
    for comp in ("vision", "embed", "decoder"):
        cmd = trtexec.trtexec_command(comp, m["trt"]["plan"]["components"][comp],
                                      trtexec="TRTEXEC_PLACEHOLDER")
        body = " \\\n    ".join(cmd).replace("TRTEXEC_PLACEHOLDER", '"$TRTEXEC"')
        assert body in script
    assert "--fp16" not in script and "--int8" not in script and "--stronglyTyped" in script


def test_check_trt_passes_on_exported_artifact(trt_llava):
    art, _ = trt_llava
    r = _run("check-trt", art)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vision.onnx" in r.stdout and "decoder.onnx" in r.stdout and "passed" in r.stdout
    r = _run("check-trt", art, "--json")
    assert json.loads(r.stdout)["passed"] is True


@pytest.mark.parametrize("args,want", [
    (["--precision", "fp32"], "--target trt takes --precision fp16, int8 or int4-fp16"),
    (["--precision", "int8-dynamic"], "--target trt takes --precision fp16, int8 or int4-fp16"),
    (["--precision", "fp16", "--max-batch", "0"], "--max-batch must be >= 1"),
    (["--precision", "fp16", "--max-images", "0"], "--max-images must be >= 1"),
])
def test_bad_trt_options_are_one_line(args, want, tmp_path):
    r = _run("--target", "trt", *args, "--output", tmp_path / "out")
    lines = [line for line in r.stderr.splitlines() if line.startswith("vlm-export")]
    assert r.returncode == 2 and len(lines) == 1 and want in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


# -- the profile plan ----------------------------------------------------------------

def test_plan_llava(trt_llava):
    art, _ = trt_llava
    m = manifest.load(art).to_dict()
    plan = profiles.make_plan(m, profiles.Limits(max_context=CONTEXT, max_batch=2, max_images=3))
    vis = plan["components"]["vision"]["profiles"]
    assert len(vis) == 1
    px = vis[0]["shapes"]["pixel_values"]  # (images, 3, H, W): images = batch * images/prompt
    assert px["min"][0] == 1 and px["max"][0] == 6 and px["min"][1:] == px["max"][1:]
    per = m["image"]["tokens_per_image"]
    prompt = min(CONTEXT, per + profiles.TEXT_TOKENS)
    emb = plan["components"]["embed"]["profiles"][0]["shapes"]["input_ids"]
    assert emb == {"min": [1, 1], "opt": [1, prompt], "max": [2, CONTEXT]}
    prefill, decode = plan["components"]["decoder"]["profiles"]
    k = "past_key_values.0.key"
    assert prefill["shapes"][k]["min"][2] == 0 and prefill["shapes"][k]["max"][2] == CONTEXT - 1
    assert prefill["shapes"]["inputs_embeds"]["opt"][1] == prompt
    assert decode["shapes"]["inputs_embeds"]["max"][1] == 1  # one-token steps
    d = decode["dims"]
    assert d["total_sequence_length"][1] == d["past_sequence_length"][1] + 1
    assert decode["shapes"]["attention_mask"]["max"] == [2, CONTEXT]
    dec = {"profiles": plan["components"]["decoder"]["profiles"]}
    assert profiles.profile_index(dec, 1) == 1 and profiles.profile_index(dec, 7) == 0


def test_plan_other_families(trt_families):
    idf = manifest.load(trt_families["idefics3"]).to_dict()
    tiles = idf["trt"]["plan"]["components"]["vision"]["profiles"][0]["dims"]["batch"]
    assert tiles == [1, 5, 5]  # 128 px longest edge / 64 px tiles: 2x2 + the global tile
    for fam in ("qwen2_vl", "qwen2_5_vl"):
        m = manifest.load(trt_families[fam]).to_dict()
        dims = m["trt"]["plan"]["components"]["vision"]["profiles"][0]["dims"]
        # 8 px patches, 2x2 merge, 256..4096 pixels: 1..16 image tokens, 4..64 patches
        assert dims["num_patches"] == [4, 64, 64] and dims["num_image_tokens"] == [1, 16, 16]
        shapes = m["trt"]["plan"]["components"]["vision"]["profiles"][0]["shapes"]
        assert "cu_seqlens" not in shapes  # built inside the graph from the patch count
        pos = m["trt"]["plan"]["components"]["decoder"]["profiles"][1]["shapes"]["position_ids"]
        assert pos["max"] == [3, 1, 1]  # mrope rows, batch, one decode token


def test_plan_errors(trt_llava):
    art, _ = trt_llava
    m = manifest.load(art).to_dict()
    with pytest.raises(UserInputError, match="--max-images 9"):
        profiles.make_plan(m, profiles.Limits(max_context=CONTEXT, max_images=9))
    with pytest.raises(UserInputError, match="--max-batch"):
        profiles.make_plan(m, profiles.Limits(max_context=CONTEXT, max_batch=0))
    m["components"]["vision"]["inputs"][0]["shape"][2] = "height"
    with pytest.raises(ArtifactError, match="'height'"):
        profiles.make_plan(m, profiles.Limits(max_context=CONTEXT))


# -- trtexec command lines --------------------------------------------------------------

def _plan_component(*profile_shapes):
    return {"profiles": [{"name": f"p{i}", "dims": {}, "shapes": s}
                         for i, s in enumerate(profile_shapes)]}


def test_trtexec_command_one_profile():
    pc = _plan_component({"x": {"min": [1, 3], "opt": [2, 3], "max": [4, 3]},
                          "ids": {"min": [1, 0], "opt": [1, 8], "max": [1, 16]}})
    assert trtexec.trtexec_command("vision", pc) == [
        "trtexec", "--onnx=vision.onnx", "--saveEngine=vision.engine", "--stronglyTyped",
        "--skipInference", "--timingCacheFile=timing.cache", "--memPoolSize=workspace:2048M",
        "--minShapes=x:1x3,ids:1x0", "--optShapes=x:2x3,ids:1x8", "--maxShapes=x:4x3,ids:1x16"]
    cmd = trtexec.trtexec_command("vision", pc, workspace_mb=None, timing_cache=None,
                                  trtexec="/usr/src/tensorrt/bin/trtexec")
    assert cmd[0] == "/usr/src/tensorrt/bin/trtexec"
    assert not any(a.startswith(("--memPoolSize", "--timingCacheFile")) for a in cmd)


def test_trtexec_command_profiles_and_names():
    a = {"past.0:key": {"min": [1], "opt": [1], "max": [1]}}
    b = {"past.0:key": {"min": [2], "opt": [3], "max": [4]}}
    cmd = trtexec.trtexec_command("decoder", _plan_component(a, b))
    i0, i1 = cmd.index("--profile=0"), cmd.index("--profile=1")
    assert cmd[i0 + 1:i1] == ["--minShapes='past.0:key':1", "--optShapes='past.0:key':1",
                              "--maxShapes='past.0:key':1"]
    assert cmd[i1 + 1:] == ["--minShapes='past.0:key':2", "--optShapes='past.0:key':3",
                            "--maxShapes='past.0:key':4"]


# -- check-trt --------------------------------------------------------------------------

def _save(model, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def _model(nodes, inputs, outputs, inits=(), opset=18, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def _vi(name, t, shape):
    return helper.make_tensor_value_info(name, t, shape)


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl", "qwen2_5_vl"])
def test_check_trt_family_fp16_passes(family, trt_llava, trt_families):
    """Qwen2-VL and Qwen2.5-VL pass since their vision graphs take attention
    segments and windows as shapes (a patch count; windows batched by the
    count of window bounds), not as Split sizes read from an input's values."""
    art = trt_llava[0] if family == "llava" else trt_families[family]
    rep = compat.check_path(art)
    assert rep.passed, compat.format_report(rep)
    assert [c.component for c in rep.components] == ["vision", "embed", "decoder"]
    assert manifest.load(art).to_dict()["trt"]["compat"]["passed"] is True


def test_check_trt_catches_unsupported_ops(tmp_path):
    """One node per kind of problem; each is reported by name, exit status 1."""
    x = _vi("x", TensorProto.FLOAT, ["n"])
    nodes = [
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),                 # data-dependent
        helper.make_node("Unique", ["x"], ["u"], name="unique"),                    # unsupported
        helper.make_node("MatMulInteger", ["a8", "b8"], ["mi"], name="matmulint"),  # int8-dynamic
        helper.make_node("FusedMatMul", ["m", "m"], ["fm"], name="fused", domain="com.microsoft"),
        helper.make_node("Cast", ["x"], ["x64"], name="to_double", to=TensorProto.DOUBLE),
        helper.make_node("Resize", ["img", "", "scales"], ["big"], name="resize_aa", mode="linear",
                         antialias=1),
        helper.make_node("MatMul", ["i32", "i32"], ["mm"], name="int_matmul"),       # type
        helper.make_node("Shape", ["x"], ["shp"], name="shape"),
        helper.make_node("Reshape", ["x", "shape_from_data"], ["r"], name="reshape_by_values"),
        helper.make_node("Unsqueeze", ["x", "axes_in"], ["us"], name="unsqueeze_dyn_axes"),
    ]
    inputs = [x, _vi("a8", TensorProto.INT8, [2, 2]), _vi("b8", TensorProto.INT8, [2, 2]),
              _vi("m", TensorProto.FLOAT, [2, 2]), _vi("img", TensorProto.FLOAT, [1, 1, 4, 4]),
              _vi("i32", TensorProto.INT32, [2, 2]),
              _vi("shape_from_data", TensorProto.INT64, [1]),
              _vi("axes_in", TensorProto.INT64, [1])]
    outs = [_vi(n, TensorProto.UNDEFINED, None) for n in
            ("nz", "u", "mi", "fm", "x64", "big", "mm", "shp", "r", "us")]
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    model = _model(nodes, inputs, outs, [scales],
                   extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    path = _save(model, tmp_path / "bad.onnx")
    rep = compat.check_path(path)
    kinds = {(f.node, f.kind) for f in rep.components[0].findings if f.severity == "error"}
    assert ("nonzero", "data-dependent-shape") in kinds
    assert ("unique", "unsupported-op") in kinds
    assert ("matmulint", "unsupported-op") in kinds
    assert ("fused", "unsupported-op") in kinds
    assert ("to_double", "type") in kinds
    assert ("resize_aa", "attribute") in kinds
    assert ("int_matmul", "type") in kinds
    assert ("reshape_by_values", "data-dependent-shape") in kinds
    assert ("unsqueeze_dyn_axes", "constant-input") in kinds
    assert not any(f.node == "shape" for f in rep.components[0].findings)
    r = _run("check-trt", path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    for node in ("nonzero", "unique", "matmulint", "fused", "reshape_by_values"):
        assert f" {node} (" in r.stdout, r.stdout
    assert "int8-dynamic" in r.stdout and "com.microsoft::FusedMatMul" in r.stdout


def _qdq_model(zero_point: np.ndarray) -> onnx.ModelProto:
    """x (1, 4) fp32 -> Q/DQ (per-tensor) -> MatMul with a Q/DQ int8 weight (per column)."""
    w = np.arange(8, dtype=np.int8).reshape(4, 2) - 4
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(zero_point, "xz"),
             numpy_helper.from_array(w, "w8"),
             numpy_helper.from_array(np.array([0.1, 0.2], np.float32), "ws"),
             numpy_helper.from_array(np.zeros(2, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w8", "ws", "wz"], ["wd"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="matmul")]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, [1, 4])],
                  [_vi("y", TensorProto.FLOAT, [1, 2])], inits)


def test_check_trt_qdq_int8(tmp_path):
    """An explicit-quantization (Q/DQ) graph as TensorRT wants it passes; the
    asymmetric forms onnxruntime can also produce are flagged."""
    ok = compat.check_path(_save(_qdq_model(np.array(0, np.int8)), tmp_path / "qdq.onnx"))
    assert ok.passed, compat.format_report(ok)
    import onnxruntime as ort  # the hand-made graph is valid ONNX and runs
    y = ort.InferenceSession(str(tmp_path / "qdq.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.ones((1, 4), np.float32)})[0]
    assert y.shape == (1, 2)
    u8 = compat.check_path(_save(_qdq_model(np.array(128, np.uint8)), tmp_path / "u8.onnx"))
    msgs = [f.message for f in u8.components[0].errors]
    assert any("uint8" in s for s in msgs) and {f.node for f in u8.components[0].errors} >= {"q_x"}
    nz = compat.check_path(_save(_qdq_model(np.array(3, np.int8)), tmp_path / "nz.onnx"))
    assert any("not 0" in f.message for f in nz.components[0].errors)


def test_int8_plan_and_commands_from_qdq_graphs(tmp_path):
    """--precision int8 takes whatever Q/DQ graphs the exporter wrote: the plan
    and the trtexec lines do not depend on the precision (strongly typed)."""
    _save(_qdq_model(np.array(0, np.int8)), tmp_path / "vision.onnx")
    spec = {"file": "vision.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}]}
    pc = {"profiles": [{"name": "images", "dims": {},
                        "shapes": profiles._shapes("vision", spec["inputs"], {})}]}
    plan = {"max_context": 8, "max_batch": 1, "max_images": 1, "components": {"vision": pc}}
    text = trtexec.build_script(plan, {"vision": spec}, family="llava", precision="int8",
                                version="test")
    assert "--stronglyTyped" in text and "--int8" not in text and "--minShapes=x:1x4" in text
    assert compat.check_path(tmp_path).passed


def test_int8_trt_export_qdq_graphs_pass(tiny_llava_dir, tmp_path):
    """--target trt --precision int8 takes the INT8 stage's Q/DQ graphs as they
    are: the vision and decoder graphs (symmetric int8, zero point 0) pass the
    check. The embed graph's weight-only int8 Gather is not a TensorRT
    pattern (int8 exists in TensorRT only behind Q/DQ), so findings there are
    allowed: they are reported, not hidden."""
    from vlmedge.demo import scenes
    from vlmedge.export import exporter

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(12):  # 8 to calibrate + 4 held out for the INT8 gate
        scenes.make_scene(scenes.EVAL_SEED_BASE + 5000 + i).image.save(calib / f"s{i}.png")
    art = tmp_path / "int8"
    try:
        exporter.run_export(exporter.ExportOptions(
            model_dir=tiny_llava_dir, output=art, target="trt", precision="int8",
            max_context=CONTEXT, calib=str(calib), calib_size=8, calib_cache="off",
            accuracy_target=0.01, min_cosine=0.01), log=lambda s: None)
    except UserInputError as e:  # a tree without the INT8 stage refuses int8
        if "not available" not in str(e):
            raise
        pytest.skip(f"--precision int8 is not available: {e}")
    m = manifest.load(art).to_dict()
    assert m["precision"] == "int8" and m["trt"]["plan"]
    rep = compat.check_path(art)
    by = {c.component: c for c in rep.components}
    assert not by["vision"].errors and not by["decoder"].errors, compat.format_report(rep)
    ops = {n.op_type for n in onnx.load(str(art / "decoder.onnx"), load_external_data=False)
           .graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert all(f.component == "embed" for f in rep.components[1].errors)
    assert "--int8" not in (art / "build_engines.sh").read_text()


def test_check_trt_bad_paths(tmp_path):
    r = _run("check-trt", tmp_path / "nope")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \x00\x01")
    r = _run("check-trt", tmp_path / "junk.onnx")
    assert r.returncode == 2 and "cannot read" in r.stderr and "Traceback" not in r.stderr


# -- without TensorRT: clear messages, help ---------------------------------------------

def _tensorrt_missing():
    from vlmedge.runtime.trt_backend import tensorrt_importable
    if tensorrt_importable():
        pytest.skip("TensorRT is importable here")


def test_build_engines_without_tensorrt_is_one_clear_line(trt_llava):
    _tensorrt_missing()
    art, _ = trt_llava
    r = _run("build-engines", art)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "needs tensorrt" in lines[0] and "install TensorRT" in lines[0]


def _with_fake_engines(art: Path, dst: Path) -> Path:
    """A copy of `art` whose manifest records (fake) engines, as build-engines would."""
    shutil.copytree(art, dst)
    m = manifest.load(dst).to_dict()
    engines = {}
    for comp in m["components"]:
        (dst / f"{comp}.engine").write_bytes(b"not an engine " + comp.encode())
        m["files"][f"{comp}.engine"] = manifest.file_entry(dst / f"{comp}.engine")
        engines[comp] = {"file": f"{comp}.engine", "profiles": [],
                         "sha256": m["files"][f"{comp}.engine"]["sha256"]}
    m["trt"].update(engines=engines, tensorrt_version="10.3.0", compute_capability="8.7")
    manifest.write(dst, m)
    return dst


def test_session_trt_without_tensorrt(trt_llava, tmp_path):
    _tensorrt_missing()
    from vlmedge.runtime import VLMSession

    art = _with_fake_engines(trt_llava[0], tmp_path / "with-engines")
    with pytest.raises(MissingDependencyError, match="tensorrt") as e:
        VLMSession(art, provider="trt")
    assert "install TensorRT" in str(e.value)
    # auto: the engines need TensorRT, so the ONNX graphs run through onnxruntime instead.
    s = VLMSession(art, provider="auto", threads=1)
    assert s.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    # No engines recorded: "trt" is onnxruntime's TensorRT EP, absent here.
    with pytest.raises(UserInputError, match="TensorrtExecutionProvider"):
        VLMSession(trt_llava[0], provider="trt")
    r = subprocess.run([str(Path(sys.executable).parent / "vlm-run"), str(art), "--provider", "trt",
                        "--prompt", "what color is the circle?"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "tensorrt" in r.stderr and "Traceback" not in r.stderr


def test_help_and_imports_without_tensorrt():
    """Every vlm-export --help works with tensorrt and cuda unimportable, and
    importing the runtime's TensorRT backend imports neither."""
    code = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorrt", "cuda"):
            raise ImportError(f"blocked {name}")
sys.meta_path.insert(0, Block())
from typer.testing import CliRunner
from vlmedge.export.cli import app
import vlmedge.runtime.trt_backend, vlmedge.runtime.cuda_rt, vlmedge.export.trt.build
for args in ([], ["check-trt"], ["build-engines"]):
    r = CliRunner().invoke(app, args + ["--help"])
    assert r.exit_code == 0, (args, r.output)
    print("HELP", args, "--max-batch" in r.output, "--timing-cache" in r.output,
          "--workspace" in r.output)
assert not any(m.split(".")[0] in ("tensorrt", "cuda") for m in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HELP [] True False False" in r.stdout
    assert "HELP ['build-engines'] False True True" in r.stdout


# -- runtime pieces testable without a GPU -----------------------------------------------

def test_preflight_refuses_other_tensorrt_or_gpu(tmp_path):
    from vlmedge.runtime.trt_backend import preflight

    t = {"engines": {"decoder": {"file": "decoder.engine"}}, "tensorrt_version": "10.3.0.30",
         "compute_capability": "8.7", "gpu_name": "Orin"}
    preflight(t, "10.3.0.30", "8.7", tmp_path)  # same device: fine
    with pytest.raises(ArtifactError, match="TensorRT 10.3.0.30") as e:
        preflight(t, "10.7.0.23", "8.7", tmp_path)
    assert f"rebuild on this device with: vlm-export build-engines {tmp_path}" in str(e.value)
    with pytest.raises(ArtifactError, match="compute capability 8.7") as e:
        preflight(t, "10.3.0.30", "9.0", tmp_path)
    assert "rebuild on this device with" in str(e.value)
    with pytest.raises(ArtifactError, match="no TensorRT engines"):
        preflight({"engines": None}, "10.3.0.30", "8.7", tmp_path)


def test_engine_bytes_are_hash_checked(tmp_path):
    from vlmedge.runtime.trt_backend import read_verified

    (tmp_path / "decoder.engine").write_bytes(b"engine bytes")
    files = {"decoder.engine": manifest.file_entry(tmp_path / "decoder.engine")}
    assert read_verified(tmp_path, "decoder.engine", files) == b"engine bytes"
    (tmp_path / "decoder.engine").write_bytes(b"engine bytez")
    with pytest.raises(ArtifactError, match="refusing to deserialize"):
        read_verified(tmp_path, "decoder.engine", files)
    with pytest.raises(ArtifactError, match="--adopt"):
        read_verified(tmp_path, "vision.engine", files)


def test_kv_slot_pool_reuses_buffers_and_frees_on_release():
    """Slots are allocated once and reused; a slot is busy while any view
    (here: a lease held by a KVCache-like tuple) lives."""
    import gc

    from vlmedge.runtime.trt_backend import DeviceTensor, KVSlotPool

    allocs = []

    class FakeBuffer:
        def __init__(self, nbytes):
            self.ptr, self.nbytes = 4096 * (len(allocs) + 1), nbytes
            allocs.append(self)

    pool = KVSlotPool({"present.0.key": 64, "present.0.value": 64}, FakeBuffer, max_slots=3)
    a = pool.acquire()
    b = pool.acquire()
    assert a.slot != b.slot and len(allocs) == 4
    view = DeviceTensor(a.buffers["present.0.key"].ptr, (1, 2, 3, 4), np.dtype(np.float16), a)
    assert view.nbytes == 48
    ptr_b = b.buffers["present.0.key"].ptr
    del b
    gc.collect()
    c = pool.acquire()  # b's slot again, no new allocation
    assert c.buffers["present.0.key"].ptr == ptr_b and len(allocs) == 4
    d = pool.acquire()
    with pytest.raises(TensorRTError, match="KV-cache slots"):
        pool.acquire()
    slot_a = a.slot
    del a
    gc.collect()
    with pytest.raises(TensorRTError):  # the view still holds a's slot
        pool.acquire()
    del view
    gc.collect()
    assert pool.acquire().slot == slot_a
    assert pool.allocated_bytes == 3 * 128 and len(allocs) == 6


def test_parity_tool_runs_here_on_cpu(trt_llava, tiny_llava_artifact):
    """benchmarks/trt_parity.py (gpu_check.sh's parity step), with the fp16
    graphs on the CPU standing in for the engines: same weights, so the logits
    agree within the fp16 tolerance."""
    r = subprocess.run([sys.executable, "-m", "vlmedge.benchmarks.trt_parity", str(trt_llava[0]),
                        str(tiny_llava_artifact[0]), "--provider", "cpu", "--scenes", "2",
                        "--accuracy-n", "3", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["logits"]["passed"] and out["logits"]["max_abs_diff_logits"] <= 0.05
    # The tool's default --max-drop, 1 point: on 3 questions one answer is 33.3
    # points, so the fp16 stand-in may answer none of them worse than fp32 (its
    # logits are within 0.05 of fp32's; measured: max |d| 0.004, drop 0). The
    # random tiny model answers 0 of 3 on both sides, so the drop bites where
    # the reference scores: the demo model in gpu_check.sh.
    acc = out["accuracy"]
    assert acc["n"] == 3 and acc["drop_points"] <= 1.0 and acc["passed"] and out["passed"]
    assert acc["drop_points"] == pytest.approx(100.0 * (acc["reference"] - acc["candidate"]))


def test_gpu_check_script_without_tensorrt(tmp_path):
    _tensorrt_missing()
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "tensorrt/cuda-python not importable" in r.stdout


# -- on a machine with TensorRT (skipped here) ---------------------------------------------

@pytest.fixture(scope="module")
def built_llava(trt_llava, tmp_path_factory):
    from vlmedge.export.trt.build import build_engines

    art = tmp_path_factory.mktemp("built") / "llava"
    shutil.copytree(trt_llava[0], art)
    summary = build_engines(art, workspace_mb=512, log=lambda s: None)
    return art, summary


@pytest.mark.trt
def test_build_engines_records_version_gpu_and_hashes(built_llava):
    art, s = built_llava
    import tensorrt as trt
    m = manifest.load(art).to_dict()
    t = m["trt"]
    assert t["tensorrt_version"] == trt.__version__ and t["compute_capability"]
    assert t["build"]["peak_host_mb"] > 0 and (art / "timing.cache").is_file()
    for comp, e in t["engines"].items():
        assert m["files"][e["file"]]["sha256"] == e["sha256"]
        assert e["profiles"] == [p["name"] for p in t["plan"]["components"][comp]["profiles"]]


@pytest.mark.trt
def test_native_engines_match_onnxruntime(built_llava, tiny_llava_artifact):
    """fp16 engines against the fp32 graphs on onnxruntime's CPU: first-step
    logits within the fp16 tolerance; the KV cache stays on the device."""
    from vlmedge.demo import scenes
    from vlmedge.runtime import VLMSession
    from vlmedge.runtime.trt_backend import DeviceTensor

    art, _ = built_llava
    trt_s = VLMSession(art, provider="trt")
    ref = VLMSession(tiny_llava_artifact[0], provider="cpu", threads=1)
    image = scenes.make_scene(scenes.EVAL_SEED_BASE + 5).image
    logits = {}
    for name, s in (("trt", trt_s), ("ref", ref)):
        pixels, grid = s.preprocess(image)
        ids = s.chat.prompt_ids("what color is the circle?", image_grid=grid)
        logits[name], cache = s.prefill(ids, s.encode_image(pixels, grid), s.empty_cache(), grid)
        if name == "trt":
            assert all(isinstance(a, DeviceTensor) for a in cache.arrays)
    assert np.abs(logits["trt"] - logits["ref"]).max() <= 1e-1
    r = trt_s.generate(image, "what color is the circle?", max_new_tokens=8)
    assert r.token_ids and r.timings["decode_ms"]


@pytest.mark.trt
def test_native_preflight_and_tampering(built_llava, tmp_path):
    from vlmedge.runtime import VLMSession

    art = tmp_path / "copy"
    shutil.copytree(built_llava[0], art)
    m = manifest.load(art).to_dict()
    m["trt"]["tensorrt_version"] = "9.9.9"
    manifest.write(art, m)
    with pytest.raises(ArtifactError, match="rebuild on this device with"):
        VLMSession(art, provider="trt")
    shutil.rmtree(art)
    shutil.copytree(built_llava[0], art)
    with open(art / "decoder.engine", "r+b") as f:  # tampered: refused before deserializing
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256"):
        VLMSession(art, provider="trt", verify=False)
    # Garbage whose hash the manifest records: TensorRT returns no engine -> an error.
    (art / "decoder.engine").write_bytes(b"\x00" * 4096)
    m = manifest.load(art, verify=False).to_dict()
    m["files"]["decoder.engine"] = manifest.file_entry(art / "decoder.engine")
    manifest.write(art, m)
    with pytest.raises(ArtifactError, match="could not deserialize"):
        VLMSession(art, provider="trt")


@pytest.mark.trt
def test_adopt_records_trtexec_engines(built_llava, tmp_path):
    from vlmedge.export.trt.build import build_engines

    art = tmp_path / "adopt"
    shutil.copytree(built_llava[0], art)
    s = build_engines(art, adopt=True, log=lambda s: None)
    assert set(s["engines"]) == {"vision", "embed", "decoder"}
    assert manifest.load(art).to_dict()["trt"]["builder"]["adopted"] is True
