"""vlm-export: tiny random-weight models and the demo model export and
validate; the manifest round-trips; names and dims are as documented; bad
input is one clear line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from vlmedge import manifest  # noqa: E402


def _run(*args, timeout=600):
    exe = str(Path(sys.executable).parent / "vlm-export")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_tiny_llava_exports_and_validates(tiny_llava_artifact):
    art, summary = tiny_llava_artifact
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"]
    assert v["max_abs_diff_logits"] <= 1e-4 and v["max_abs_diff_image_features"] <= 1e-4
    assert v["cached_vs_recompute_max_abs_diff"] <= 1e-4
    m = manifest.load(art)  # verifies every sha256
    assert m.family == "llava" and m.schema_version == manifest.SCHEMA_VERSION
    assert set(summary["files"]) == set(m.files)
    assert all((art / f).is_file() for f in m.files)
    assert m.validation["tokens_match"] is True
    # Weights live in external data files.
    for comp in ("vision", "embed", "decoder"):
        assert (art / f"{comp}.onnx.data").stat().st_size > 1000


def test_names_and_dynamic_dims(tiny_llava_artifact):
    art, _ = tiny_llava_artifact
    dec = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    ins = {v.name: _dims(v) for v in dec.graph.input}
    outs = {v.name: _dims(v) for v in dec.graph.output}
    assert ins["inputs_embeds"][:2] == ["batch", "sequence_length"]
    assert ins["attention_mask"] == ["batch", "total_sequence_length"]
    assert ins["position_ids"] == ["batch", "sequence_length"]
    assert ins["past_key_values.0.key"][0] == "batch"
    assert ins["past_key_values.0.key"][2] == "past_sequence_length"
    assert outs["present.0.value"][2] == "total_sequence_length"
    assert outs["logits"][:2] == ["batch", 1]
    emb = onnx.load(str(art / "embed.onnx"), load_external_data=False)
    assert [v.name for v in emb.graph.input] == ["input_ids"]
    assert [v.name for v in emb.graph.output] == ["inputs_embeds"]
    vis = onnx.load(str(art / "vision.onnx"), load_external_data=False)
    assert [v.name for v in vis.graph.input] == ["pixel_values"]
    assert [v.name for v in vis.graph.output] == ["image_features"]
    assert _dims(vis.graph.input[0])[0] == "batch"


def test_manifest_round_trips_and_detects_tampering(tiny_llava_artifact, tmp_path):
    import shutil

    from vlmedge.errors import ArtifactError

    art, _ = tiny_llava_artifact
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    typed = manifest.load(copy)
    manifest.write(copy, typed)
    assert manifest.load(copy) == typed
    with open(copy / "embed.onnx.data", "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="embed.onnx.data"):
        manifest.load(copy)
    m = typed.to_dict()
    m["schema_version"] = manifest.SCHEMA_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="newer"):
        manifest.load(copy, verify=False)


def test_existing_output_needs_force(tiny_llava_artifact, tiny_llava_dir):
    art, _ = tiny_llava_artifact
    before = (art / "manifest.json").read_bytes()
    r = _run("--model", tiny_llava_dir, "--output", art, "--no-validate")
    assert r.returncode != 0
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (art / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("kw, name", [
    (dict(), "demo-onnx-fp32"),
    (dict(decoder_flavour="ort"), "demo-ort-fp32"),
    (dict(precision="int4"), "demo-ort-int4"),  # int4's default flavour
    (dict(precision="int4", decoder_flavour="portable"), "demo-onnx-int4"),
    (dict(precision="int4", decoder_flavour="both"), "demo-both-int4"),
    (dict(target="trt", precision="int4-fp16"), "demo-trt-int4-fp16"),
])
def test_default_output_names_the_decoder_flavour(kw, name):
    """The README's exports of the demo, one after another, each land in a
    directory of their own (the ort flavour's was demo-onnx-fp32 again, and
    failed on the first one's)."""
    from vlmedge.export.cli import _default_output
    from vlmedge.export.exporter import ExportOptions

    assert _default_output("demo", ExportOptions(Path(), Path(), **kw)) == Path(name)


@pytest.mark.parametrize("case", ["missing", "no_config", "unsupported", "pickle_only", "bad_precision"])
def test_bad_input_is_one_clear_line(case, tmp_path, tiny_llava_dir):
    out = tmp_path / "out"
    args = ["--output", out]
    if case == "missing":
        args += ["--model", tmp_path / "nope"]
        want = "does not exist"
    elif case == "no_config":
        (tmp_path / "m").mkdir()
        args += ["--model", tmp_path / "m"]
        want = "no config.json"
    elif case == "unsupported":
        d = tmp_path / "bert"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
        args += ["--model", d]
        want = "unsupported architecture"
    elif case == "pickle_only":
        import shutil
        d = tmp_path / "pk"
        shutil.copytree(tiny_llava_dir, d)
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
        args += ["--model", d]
        want = "pickle"
    else:
        args += ["--precision", "int3"]
        want = "unknown --precision"
    r = _run(*args)
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("vlm-export")]
    assert len(lines) == 1 and want in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not list(tmp_path.glob("out.partial-*"))


def test_unwritable_output_is_refused(tmp_path, tiny_llava_dir):
    import os
    if os.geteuid() == 0:
        target = Path("/proc/vlmedge-cannot-write/out")  # even root cannot create here
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "out"
    r = _run("--model", tiny_llava_dir, "--output", target, "--no-validate")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "cannot create" in r.stderr or "not writable" in r.stderr


def test_failed_validation_keeps_nothing_unless_asked(tmp_path, tiny_llava_dir, monkeypatch):
    """A family whose tolerance no export can meet: the export must fail and
    leave no loadable directory; with --keep-failed it is kept as .failed."""
    from vlmedge.export import exporter
    from vlmedge.export.families import FAMILIES
    from vlmedge.errors import ValidationError

    monkeypatch.setattr(FAMILIES["llava"], "tolerances", {"image_features": 0.0, "logits": -1.0})
    out = tmp_path / "out"
    opts = exporter.ExportOptions(model_dir=Path(tiny_llava_dir), output=out)
    with pytest.raises(ValidationError, match="max_abs_diff_logits"):
        exporter.run_export(opts, log=lambda s: None)
    assert not out.exists() and not list(tmp_path.glob("out.*"))
    opts.keep_failed = True
    with pytest.raises(ValidationError):
        exporter.run_export(opts, log=lambda s: None)
    failed = tmp_path / "out.failed"
    assert failed.is_dir() and not out.exists()
    assert not (failed / "manifest.json").exists()  # a failed export never loads ...
    m = json.loads((failed / "manifest.rejected.json").read_text())  # ... but can be inspected
    assert m["validation"]["passed"] is False


def test_image_feature_bound_scales_with_the_features(tiny_llava_artifact, tmp_path,
                                                     tiny_llava_dir, monkeypatch):
    """Image features are held to tol x max(1, their largest magnitude); the
    figure is in the validation record and in a failure's one line."""
    from vlmedge.errors import ValidationError
    from vlmedge.export import exporter
    from vlmedge.export.families import FAMILIES

    v = tiny_llava_artifact[1]["validation"]
    scale = v["image_features_scale"]
    assert scale >= 1.0
    assert v["image_features_bound"] == v["tolerances"]["image_features"] * scale  # fp32
    assert v["max_abs_diff_image_features"] <= v["image_features_bound"]
    monkeypatch.setattr(FAMILIES["llava"], "tolerances", {"image_features": -1.0, "logits": 1e-4})
    opts = exporter.ExportOptions(model_dir=Path(tiny_llava_dir), output=tmp_path / "out")
    with pytest.raises(ValidationError, match=r"max_abs_diff_image_features=.*largest feature") \
            as e:
        exporter.run_export(opts, log=lambda s: None)
    assert "\n" not in str(e.value)


def test_fp16_feature_bound_is_fp16_steps_at_the_features_scale():
    """fp32: tol x scale; fp16: tol + 4 fp16 steps (2^-10) at the largest feature."""
    from vlmedge.export.validate import image_features_bound

    assert image_features_bound("fp32", 1e-4, 80.0) == pytest.approx(8e-3)
    assert image_features_bound("fp16", 5e-2, 1.0) == pytest.approx(0.05390625)
    assert image_features_bound("fp16", 5e-2, 78.5) == pytest.approx(0.3566406)  # the demo's
    assert image_features_bound("fp16", 5e-2, 78.5) < 5e-2 * 78.5 / 10  # not the fp32 rule


@pytest.mark.slow
def test_full_size_smolvlm_256m_preset_exports_with_external_data(tmp_path):
    """A full-size random-weight SmolVLM-256M-shaped model from the committed
    preset config: weights go to external data and onnxruntime loads them."""
    import onnxruntime as ort

    from vlmedge.export import exporter

    preset = Path(__file__).resolve().parents[1] / "benchmarks" / "presets" / "smolvlm-256m"
    out = tmp_path / "smol"
    summary = exporter.run_export(exporter.ExportOptions(
        model_dir=preset, output=out, random_weights=True, validate=True), log=print)
    assert summary["random_weights"] and summary["validation"]["passed"]
    m = manifest.load(out)
    assert m.source.random_weights is True
    for comp in ("vision", "embed", "decoder"):
        proto = onnx.load(str(out / f"{comp}.onnx"), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external, comp
        assert (out / f"{comp}.onnx").stat().st_size < 5_000_000  # weights are not inline
        ort.InferenceSession(str(out / f"{comp}.onnx"), providers=["CPUExecutionProvider"])
    assert summary["total_bytes"] > 900_000_000  # ~256M parameters in fp32


def test_sigterm_during_export_leaves_nothing_behind(tmp_path):
    """A `kill` (SIGTERM) mid-write removes the staging directory like Ctrl-C
    does, instead of leaving <out>.partial-<pid> behind."""
    import os
    import signal

    from vlmedge.export import artifact

    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        with artifact.staging(out, force=False) as staged:
            (staged.path / "vision.onnx").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))
    assert not (tmp_path / "out.lock").exists()  # the export lock is released too
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is restored
