"""An artifact is untrusted input, and a runtime runs for months: containment,
the strict typed manifest, staging that never leaves a loadable partial,
concurrent exports, the session's lock, and bad input through the API and
the CLIs (issue 12). Each test failed on the code before the fix."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from vlmedge import manifest
from vlmedge.demo import scenes
from vlmedge.errors import ArtifactError, UserInputError


def _bin(name):
    return str(Path(sys.executable).parent / name)


@pytest.fixture
def art(tiny_llava_artifact, tmp_path):
    """A private copy of the tiny LLaVA artifact, free to tamper with."""
    dst = tmp_path / "art"
    shutil.copytree(tiny_llava_artifact[0], dst)
    return dst


@pytest.fixture
def secret(tmp_path):
    """A file outside the artifact that nothing may read."""
    d = tmp_path / "outside"
    d.mkdir()
    f = d / "secret.onnx"
    f.write_bytes(b"secret bytes the artifact must never reach")
    return f


def _edit(art: Path, change) -> None:
    m = json.loads((art / "manifest.json").read_text())
    change(m)
    (art / "manifest.json").write_text(json.dumps(m))


def _open(art: Path, **kw):
    from vlmedge.runtime import VLMSession
    return VLMSession(art, provider="cpu", threads=1, **kw)


def _vlm_run(*args, timeout=120):
    return subprocess.run([_bin("vlm-run"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if not x.startswith("vlmedge: warning")]
    assert len(lines) == 1 and lines[0].startswith("vlm-run: error:"), r.stderr
    return lines[0]


# -- containment: nothing outside the artifact, nothing unlisted -------------------------

@pytest.mark.parametrize("where", ["absolute", "dotdot"])
def test_component_graph_outside_the_artifact_is_refused(art, secret, where):
    shutil.copy(art / "vision.onnx", secret)  # a loadable graph, outside
    name = str(secret) if where == "absolute" else os.path.relpath(secret, art)
    _edit(art, lambda m: m["components"]["vision"].update(file=name))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        _open(art)


def test_unlisted_graph_inside_the_artifact_is_refused(art):
    shutil.copy(art / "vision.onnx", art / "evil.onnx")
    _edit(art, lambda m: m["components"]["vision"].update(file="evil.onnx"))
    with pytest.raises(ArtifactError, match="not listed"):
        _open(art)


def test_files_entry_outside_is_neither_opened_nor_hashed(art, secret):
    name = "../" * 8 + str(secret).lstrip("/")
    _edit(art, lambda m: m["files"].update({name: manifest.file_entry(secret)}))
    with pytest.raises(ArtifactError) as e:
        _open(art)
    assert "outside the artifact" in str(e.value)
    assert manifest.sha256_file(secret)[:8] not in str(e.value)  # no hash of a file outside


def test_tokenizer_outside_is_refused(art, secret):
    shutil.copy(art / "tokenizer.json", secret)
    name = os.path.relpath(secret, art)
    _edit(art, lambda m: (m["files"].update({name: manifest.file_entry(secret)}),
                          m["tokenizer"].update(file=name)))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        _open(art)


def test_symlink_leaving_the_artifact_is_refused(art, secret):
    shutil.copy(art / "tokenizer.json", secret)
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(secret)  # same bytes, so the sha256 matches
    with pytest.raises(ArtifactError, match="resolves outside"):
        _open(art)


def test_symlink_inside_the_artifact_is_allowed(art):
    want = _open(art).generate(scenes.make_scene(4).image, "describe the image.",
                               max_new_tokens=4).token_ids
    (art / "tok-real.json").write_bytes((art / "tokenizer.json").read_bytes())
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to("tok-real.json")
    got = _open(art).generate(scenes.make_scene(4).image, "describe the image.",
                              max_new_tokens=4).token_ids
    assert got == want


def _relocate_external_data(art: Path, graph: str, new_location: str) -> None:
    """Points every external tensor of `graph` at `new_location` and re-lists
    the graph's own hash, as a hostile exporter would."""
    import onnx

    proto = onnx.load(str(art / graph), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = new_location
    (art / graph).write_bytes(proto.SerializeToString())
    _edit(art, lambda m: m["files"].update({graph: manifest.file_entry(art / graph)}))


def test_graph_reading_unlisted_external_data_is_refused(art):
    shutil.copy(art / "decoder.onnx.data", art / "unlisted.data")
    _relocate_external_data(art, "decoder.onnx", "unlisted.data")
    with pytest.raises(ArtifactError, match="not listed"):
        _open(art)


def test_graph_reading_another_components_data_is_refused(art):
    _relocate_external_data(art, "decoder.onnx", "vision.onnx.data")
    with pytest.raises(ArtifactError, match="not its own data file"):
        _open(art)


def test_external_data_reader_matches_onnx(tiny_llava_artifact):
    """vlmedge/onnx_refs.py (stdlib only) finds what the onnx package finds."""
    import onnx

    from vlmedge.onnx_refs import external_data_locations

    for g in ("vision", "embed", "decoder"):
        path = tiny_llava_artifact[0] / f"{g}.onnx"
        proto = onnx.load(str(path), load_external_data=False)
        want = {e.value for t in proto.graph.initializer for e in t.external_data
                if e.key == "location"}
        assert want and external_data_locations(path.read_bytes()) == want


def test_graph_in_a_subfolder_is_refused(art):
    """onnxruntime resolves a graph's external data beside the graph: from
    sub/vision.onnx, 'vision.onnx.data' would be an unlisted sub/ file."""
    (art / "sub").mkdir()
    shutil.copy(art / "vision.onnx", art / "sub" / "vision.onnx")
    (art / "sub" / "vision.onnx.data").write_bytes(
        bytes((art / "vision.onnx.data").stat().st_size))  # zeros: other weights
    _edit(art, lambda m: (m["files"].update({"sub/vision.onnx": manifest.file_entry(
        art / "sub" / "vision.onnx")}), m["components"]["vision"].update(file="sub/vision.onnx")))
    with pytest.raises(ArtifactError, match="does not lie directly in the artifact"):
        _open(art)


def test_graph_symlinked_into_a_subfolder_is_refused(art):
    (art / "models").mkdir()
    shutil.move(art / "vision.onnx", art / "models" / "v.onnx")
    (art / "vision.onnx").symlink_to("models/v.onnx")
    (art / "models" / "vision.onnx.data").write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError, match="does not lie directly in the artifact"):
        _open(art)


@pytest.mark.parametrize("name", ["*/_ORT_MEM_ADDR_/*", "vision onnx", "v\u00e9.onnx",
                                  "a\\b.onnx"])
def test_unusual_file_names_are_refused(art, name):
    _edit(art, lambda m: m["files"].update({name: m["files"]["vision.onnx"]}))
    with pytest.raises(ArtifactError, match=r"A-Za-z0-9"):
        _open(art)


def test_ep_context_node_is_refused(art):
    """An EPContext node names an execution-provider cache file of its own."""
    import onnx
    from onnx import helper

    node = helper.make_node("EPContext", ["input_ids"], ["inputs_embeds"], domain="com.microsoft",
                            embed_mode=0, ep_cache_context="../outside/engine.bin")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input_ids", 7, [1, 2])],
                              [helper.make_tensor_value_info("inputs_embeds", 1, [1, 2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(art / "embed.onnx"))
    _edit(art, lambda m: m["files"].update({"embed.onnx": manifest.file_entry(
        art / "embed.onnx")}))
    with pytest.raises(ArtifactError, match="EPContext"):
        _open(art)


def test_check_trt_holds_graphs_to_the_same_rules(art):
    from vlmedge.export.trt.compat import check_path

    shutil.copy(art / "decoder.onnx.data", art / "unlisted.data")
    _relocate_external_data(art, "decoder.onnx", "unlisted.data")
    with pytest.raises(ArtifactError, match="not listed"):
        check_path(art)


def test_trt_engine_name_outside_is_refused(art, secret):
    from vlmedge.runtime.trt_backend import read_verified

    files = {"../outside/secret.onnx": {"sha256": manifest.sha256_file(secret), "bytes": 1}}
    with pytest.raises(ArtifactError, match="outside the artifact"):
        read_verified(art, "../outside/secret.onnx", files)


def _strace_opens(args, log: Path):
    """Runs `args` under strace, recording every file any thread opens."""
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,openat2", "-o", str(log),
                        *map(str, args)], capture_output=True, text=True, timeout=300)
    if "Operation not permitted" in r.stderr and "ptrace" in r.stderr:
        pytest.skip("ptrace is not permitted here")
    return r, log.read_text()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_native_code_opens_nothing_outside_the_artifact(art, secret, tmp_path):
    """The whole process, native libraries included (onnxruntime opens graphs
    and their external data itself), watched by strace: hostile manifests
    never make anything open the secret beside the artifact."""
    r, trace = _strace_opens([_bin("vlm-run"), art, "--no-stream", "-n", "2"], tmp_path / "ok")
    assert r.returncode == 0, r.stderr
    assert "vision.onnx.data" in trace  # the control: onnxruntime's own opens are seen
    shutil.copy(art / "vision.onnx", secret)
    hostile = {
        "absolute graph": lambda a: _edit(a, lambda m: m["components"]["vision"].update(
            file=str(secret))),
        "dotdot graph": lambda a: _edit(a, lambda m: m["components"]["vision"].update(
            file=os.path.relpath(secret, a))),
        "files entry": lambda a: _edit(a, lambda m: m["files"].update(
            {os.path.relpath(secret, a): manifest.file_entry(secret)})),
        "data symlink": lambda a: ((a / "vision.onnx.data").unlink(),
                                   (a / "vision.onnx.data").symlink_to(secret)),
    }
    for i, (name, make) in enumerate(hostile.items()):
        copy = tmp_path / f"hostile{i}"
        shutil.copytree(art, copy, symlinks=True)
        make(copy)
        r, trace = _strace_opens([_bin("vlm-run"), copy, "--no-stream", "-n", "2"],
                                 tmp_path / f"trace{i}")
        assert r.returncode == 2, (name, r.stderr)
        assert "secret.onnx" not in trace, f"{name}: opened the file outside the artifact"


# -- the typed manifest: one clear line for every malformed section ----------------------

def _set(path: str, value):
    def change(m):
        *keys, last = path.split(".")
        d = m
        for k in keys:
            d = d[k]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return change


_DELETE = object()
MALFORMED = {
    "files_as_list": (_set("files", ["vision.onnx"]), "files"),
    "entry_without_sha256": (lambda m: m["files"]["vision.onnx"].pop("sha256"),
                             "files.vision.onnx.sha256"),
    "component_without_file": (_set("components.vision.file", _DELETE),
                               "components.vision.file"),
    "no_context_length": (_set("decoder.context_length", _DELETE), "decoder.context_length"),
    "context_length_1e9": (_set("decoder.context_length", 10 ** 9), "decoder.context_length"),
    "wrong_num_layers": (_set("decoder.num_layers", 5), "num_layers"),
    "non_integer_stop_ids": (_set("tokenizer.stop_token_ids", ["2"]), "stop_token_ids"),
    "stop_ids_as_int": (_set("tokenizer.stop_token_ids", 2), "stop_token_ids"),
    "template_syntax_error": (_set("tokenizer.chat_template", "{% for x in %}"), "chat template"),
    "template_sandbox": (_set("tokenizer.chat_template",
                              "{{ ''.__class__.__mro__[1].__subclasses__() }}"), "chat template"),
    "preprocess_size_1e6": (_set("preprocess.size", 10 ** 6), "preprocess"),
    "no_present_key": (_set("decoder.present_key", _DELETE), "decoder.present_key"),
    "present_key_attribute": (_set("decoder.present_key", "{i.__class__}"),
                              "decoder.present_key"),
    "unknown_key": (_set("decoder.rope_scaling", 2.0), "decoder.rope_scaling"),
    "bool_as_int": (_set("decoder.num_layers", True), "decoder.num_layers"),
    "empty_manifest": (lambda m: m.clear(), "schema_version"),
    "deep_nesting": (lambda m: m.update(validation=_nested(600)), "nests deeper"),
    "mrope_without_qwen_image": (lambda m: m["decoder"].update(position_ids="mrope",
                                                               mrope_section=[2, 1, 1]),
                                 "decoder.position_ids"),
    "tiling_method_list": (_set("preprocess.tiling", {"method": [1]}), "preprocess.tiling"),
    "template_renders_nothing": (_set("tokenizer.chat_template", "{% if false %}{% endif %}"),
                                 "empty prompt"),
    "template_without_image": (_set("tokenizer.chat_template", "{{ bos_token }} hello"),
                               "does not place the image"),
    "template_huge_string": (_set("tokenizer.chat_template", "{{ 'x' * 10**13 }}"),
                             "chat template"),
    "template_nested_loops": (_set("tokenizer.chat_template",
                                   "{% for a in range(100000) %}{% for b in range(100000) %}"
                                   "{% endfor %}{% endfor %}"), "chat template"),
    "template_too_long": (_set("tokenizer.chat_template", "x" * 70_000), "too long"),
    "trt_engines_without_plan": (lambda m: _fake_engines(m, plan=False), "trt.plan"),
    "trt_engines_partial": (lambda m: _fake_engines(m, comps=("vision",)), "trt.engines"),
}


def _nested(depth):
    node = []
    for _ in range(depth):
        node = [node]
    return node


def _fake_engines(m, plan=True, comps=("vision", "embed", "decoder")):
    m["target"] = "trt"
    m["trt"] = {"engines": {c: {"file": f"{c}.onnx", "sha256": m["files"][f"{c}.onnx"]["sha256"]}
                            for c in comps}}
    if plan:
        m["trt"]["plan"] = {"components": {c: {"profiles": [{"name": "p"}]} for c in comps}}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_manifest_is_one_artifact_error(art, case):
    change, key = MALFORMED[case]
    _edit(art, change)
    with pytest.raises(ArtifactError) as e:
        _open(art)
    assert key in str(e.value) and str(e.value).isprintable()


@pytest.mark.parametrize("case", ["no_present_key", "template_sandbox", "preprocess_size_1e6"])
def test_malformed_manifest_through_vlm_run(art, case):
    _edit(art, MALFORMED[case][0])
    _one_line(_vlm_run(art, "--no-stream", "-n", "2"))


def test_schema_1_manifest_is_migrated(art):
    def to_v1(m):
        m["schema_version"] = 1
        for key in ("quantization", "validation", "trt"):
            m.pop(key)
        m["decoder"].pop("sliding_window", None)
        m["image"].pop("expand")
        m["tokenizer"].pop("add_special_tokens")
    _edit(art, to_v1)
    s = _open(art)
    assert s.manifest.schema_version == manifest.SCHEMA_VERSION
    assert s.manifest.decoder.sliding_window is None and s.manifest.image.expand == "repeat"
    assert s.generate(scenes.make_scene(2).image, "describe the image.", max_new_tokens=3)


def test_exporter_never_writes_a_manifest_the_runtime_refuses(art, tmp_path):
    m = json.loads((art / "manifest.json").read_text())
    m["decoder"]["num_layers"] = "2"
    with pytest.raises(ValueError, match="decoder.num_layers"):
        manifest.write(tmp_path, m)
    assert not (tmp_path / "manifest.json").exists()


def test_artifact_path_that_is_a_file(art):
    with pytest.raises(ArtifactError, match="is a file, not an artifact directory"):
        _open(art / "manifest.json")


# -- staging: no loadable partials, concurrent exports -------------------------------------

_EXPORT_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
from vlmedge.export import exporter
out, mode = Path(sys.argv[1]), sys.argv[2]
real = exporter._validate
def hooked(*a, **k):
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-validation, no clean-up at all
    Path(str(out) + ".ready").touch()
    while not Path(str(out) + ".go").exists():  # paused until the test says go
        time.sleep(0.05)
    return real(*a, **k)
exporter._validate = hooked
exporter.run_export(exporter.ExportOptions(model_dir=Path(sys.argv[3]), output=out),
                    log=lambda s: None)
print("exported")
"""


def _loadable(directory: Path) -> list[Path]:
    found = []
    for d in directory.iterdir():
        try:
            manifest.load(d, verify=False)
            found.append(d)
        except ArtifactError:
            pass
    return found


def test_export_killed_during_validation_leaves_nothing_loadable(tmp_path, tiny_llava_dir):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT, str(out), "kill",
                        str(tiny_llava_dir)], capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    partials = list(tmp_path.glob("out.partial-*"))
    assert partials and (partials[0] / "decoder.onnx").is_file()  # it died mid-export ...
    assert _loadable(tmp_path) == []  # ... and nothing it left behind loads
    # The next export cleans the dead one's staging directory and its lock.
    from vlmedge.export import exporter
    exporter.run_export(exporter.ExportOptions(model_dir=tiny_llava_dir, output=out,
                                               validate=False), log=lambda s: None)
    assert _loadable(tmp_path) == [out]
    assert not list(tmp_path.glob("out.partial-*")) and not (tmp_path / "out.lock").exists()


def test_concurrent_export_to_one_output_fails_clearly(tmp_path, tiny_llava_dir):
    from vlmedge.export import exporter

    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", _EXPORT_SCRIPT, str(out), "pause",
                              str(tiny_llava_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        ready = Path(str(out) + ".ready")
        for _ in range(1200):
            if ready.exists() or first.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert ready.exists(), first.communicate()[1][-2000:]
        with pytest.raises(UserInputError, match=f"another export \\(pid {first.pid}\\)"):
            exporter.run_export(exporter.ExportOptions(model_dir=tiny_llava_dir, output=out,
                                                       validate=False), log=lambda s: None)
        assert list(tmp_path.glob("out.partial-*"))  # the first one's work is untouched
        Path(str(out) + ".go").touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and "exported" in stdout, stderr[-2000:]
    assert manifest.load(out).validation["passed"]


def test_unwritable_output_fails_before_any_work(tmp_path, tiny_llava_dir):
    """`-o /proc/x`: the parent exists but nothing can be created in it."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        target = ro / "x"
    else:
        target = Path("/proc/x")
    r = subprocess.run([_bin("vlm-export"), "--model", str(tiny_llava_dir), "-o", str(target)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "cannot write in the output directory" in r.stderr


# -- the session lock is held inside a call only -----------------------------------------

def _run_with_timeout(fn, seconds=60):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # reported to the test below
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "deadlock: the call did not finish"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_half_read_stream_blocks_nothing(tiny_llava_artifact):
    s = _open(tiny_llava_artifact[0])
    img = scenes.make_scene(3).image
    want = s.generate(img, "describe the image.", max_new_tokens=6).text

    def same_thread():
        g = s.stream(img, "what color is the circle?", max_new_tokens=6)
        next(g)  # half-read
        r = s.generate(img, "describe the image.", max_new_tokens=6)  # deadlocked before
        rest = list(g)
        return r, rest

    r, _ = _run_with_timeout(same_thread)
    assert r.text == want
    g = s.stream(img, "what color is the circle?", max_new_tokens=6)
    next(g)
    other = _run_with_timeout(lambda: s.generate(img, "describe the image.", max_new_tokens=6))
    assert other.text == want
    g.close()


def test_preprocess_from_another_thread_does_not_corrupt_answers(tiny_llava_artifact):
    s = _open(tiny_llava_artifact[0])
    img, other = scenes.make_scene(5).image, scenes.make_scene(6).image
    want = s.generate(img, "describe the image.", max_new_tokens=4).token_ids
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            s.pixel_values(other)
            s.preprocess(other)

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        got = [s.generate(img, "describe the image.", max_new_tokens=4).token_ids
               for _ in range(60)]
    finally:
        stop.set()
        t.join(30)
    assert sum(g != want for g in got) == 0


def test_pixel_values_are_the_callers_own(tiny_llava_artifact):
    s = _open(tiny_llava_artifact[0])
    a = s.pixel_values(scenes.make_scene(1).image)
    keep = a.copy()
    b = s.pixel_values(scenes.make_scene(2).image)
    assert not np.shares_memory(a, b) and np.array_equal(a, keep)


# -- bad input through the API ---------------------------------------------------------------

@pytest.fixture(scope="module")
def session(tiny_llava_artifact):
    return _open(tiny_llava_artifact[0])


BAD_CALLS = {
    "lone_surrogate": dict(prompt="what\udcff color?"),
    "prompt_none": dict(prompt=None),
    "prompt_bytes": dict(prompt=b"what color?"),
    "nan_temperature": dict(temperature=float("nan")),
    "inf_temperature": dict(temperature=float("inf")),
    "string_temperature": dict(temperature="0.5"),
    "nan_repetition_penalty": dict(repetition_penalty=float("nan")),
    "nan_top_p": dict(top_p=float("nan"), temperature=1.0),
    "max_new_tokens_float": dict(max_new_tokens=2.5),
    "max_new_tokens_str": dict(max_new_tokens="5"),
    "max_new_tokens_none": dict(max_new_tokens=None),
    "max_new_tokens_bool": dict(max_new_tokens=True),
    "top_k_float": dict(top_k=2.5, temperature=1.0),
    "seed_str": dict(seed="1"),
    "stop_str": dict(stop="."),
    "image_markers_disagree": dict(prompt="<image> and <image>: what color?"),
    "two_images": dict(image="two"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_call_is_a_user_error(session, case):
    kw = dict(image=scenes.make_scene(1).image, prompt="what color is the circle?",
              max_new_tokens=3)
    kw.update(BAD_CALLS[case])
    if kw["image"] == "two":
        kw["image"] = [scenes.make_scene(1).image, scenes.make_scene(2).image]
        kw["prompt"] = "<image> what color?"
    image, prompt = kw.pop("image"), kw.pop("prompt")
    with pytest.raises(UserInputError) as e:
        session.generate(image, prompt, **kw)
    assert str(e.value).isprintable()
    if case == "two_images":  # several images, one <image> marker
        assert "markers" in str(e.value)
    with pytest.raises(UserInputError):  # stream() checks when called, not when first read
        session.stream(image, prompt, **kw)


@pytest.mark.parametrize("threads", [-3, 0, 2.5, "2", True])
def test_threads_must_be_positive(tiny_llava_artifact, threads):
    from vlmedge.runtime import VLMSession

    with pytest.raises(UserInputError, match="threads"):
        VLMSession(tiny_llava_artifact[0], provider="cpu", threads=threads)


def test_extreme_aspect_ratio_is_a_clear_error(session, tmp_path):
    from PIL import Image

    path = tmp_path / "strip.png"
    Image.new("RGB", (20_000_000, 1), (200, 10, 10)).save(path)  # ~60 kB, under Pillow's limit
    assert path.stat().st_size < 200_000
    for image in (str(path), np.zeros((1, 20_000_000, 3), np.uint8)):
        with pytest.raises(UserInputError, match="too elongated"):
            session.generate(image, "what color is the circle?", max_new_tokens=2)
    line = _one_line(_vlm_run(session.directory, "--image", path, "--no-stream", "-n", "2"))
    assert "too elongated" in line


# -- bad input through vlm-run ---------------------------------------------------------------

def test_vlm_run_refuses_images_and_markers_that_disagree(tiny_llava_artifact, tmp_path):
    img = tmp_path / "a.png"
    scenes.make_scene(1).image.save(img)
    line = _one_line(_vlm_run(tiny_llava_artifact[0], "--image", img, "--image", img,
                              "--prompt", "<image> what color?"))
    assert "markers" in line


def test_vlm_run_negative_threads(tiny_llava_artifact):
    assert "--threads" in _one_line(_vlm_run(tiny_llava_artifact[0], "--threads", "-3"))


def test_vlm_run_invalid_utf8_prompt(tiny_llava_artifact):
    r = subprocess.run([os.fsencode(_bin("vlm-run")), os.fsencode(tiny_llava_artifact[0]),
                        b"--prompt", b"what \xff\xfe color", b"--no-stream"],
                       capture_output=True, timeout=120)
    r.stderr, r.stdout = r.stderr.decode(errors="replace"), r.stdout.decode(errors="replace")
    assert "not valid Unicode" in _one_line(r)


def test_vlm_run_image_markers_in_prompt(tiny_llava_artifact):
    """Two <image> markers for the one (demo) image: refused in one line."""
    line = _one_line(_vlm_run(tiny_llava_artifact[0], "--prompt", "<image> <image> what color?"))
    assert "markers" in line


def test_vlm_run_artifact_that_is_a_file(tiny_llava_artifact):
    assert "is a file" in _one_line(_vlm_run(tiny_llava_artifact[0] / "manifest.json"))


# -- vlm-bench checks what it benchmarks ------------------------------------------------------

def test_vlm_bench_refuses_a_tampered_artifact(art):
    data = bytearray((art / "decoder.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (art / "decoder.onnx.data").write_bytes(bytes(data))
    r = subprocess.run([_bin("vlm-bench"), str(art), "--runs", "1", "--warmup", "0", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "sha256" in r.stderr and "Traceback" not in r.stderr, r.stderr
    from vlmedge.benchmarks.bench.systems import artifact_specs
    assert artifact_specs([art], verify=False)  # --no-verify benchmarks it (with a warning)


def test_vlm_bench_no_verify_warns(art):
    r = subprocess.run([_bin("vlm-bench"), str(art), "--runs", "1", "--warmup", "0",
                        "--new-tokens", "2", "--no-verify", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "--no-verify" in r.stderr and "not checked" in r.stderr


# -- classes of defects the fuzz harness found (tests/test_fuzz.py) ----------------------------

def test_extreme_temperature_samples_instead_of_nan(session):
    """A temperature of 1e-300 made logits / T overflow to inf and the
    probabilities NaN (numpy's ValueError from rng.choice)."""
    r = session.generate(scenes.make_scene(2).image, "describe the image.", max_new_tokens=3,
                         temperature=1e-300, repetition_penalty=1e300, seed=1)
    greedy = session.generate(scenes.make_scene(2).image, "describe the image.",
                              max_new_tokens=1)
    assert r.token_ids[:1] == greedy.token_ids[:1]  # T -> 0 is greedy


def test_preprocess_that_disagrees_with_the_graph_is_an_artifact_error(art):
    """A manifest whose preprocessing makes pixels of another size than the
    vision graph takes: onnxruntime's InvalidArgument came through raw."""
    _edit(art, lambda m: m["preprocess"].update(crop=None, size=96))
    s = _open(art)
    with pytest.raises(ArtifactError, match=r"vision.onnx takes pixel_values of shape"):
        s.generate(scenes.make_scene(2).image, "describe the image.", max_new_tokens=2)


def test_error_text_from_the_artifact_stays_on_one_line(art):
    """An unknown key with a newline in its name made a two-line error."""
    _edit(art, lambda m: m["decoder"].update({"evil\nkey": 1}))
    line = _one_line(_vlm_run(art, "--no-stream", "-n", "2"))
    assert "unknown manifest key" in line


def test_error_text_cannot_drive_the_terminal(art):
    """A template's raise_exception text with ESC sequences (clear screen, set
    the window title), a vertical tab and a line separator comes out escaped."""
    _edit(art, _set("tokenizer.chat_template",
                    "{{ raise_exception('\x1b[2J\x1b]0;pwned\x07 evil\x0bsecond\u2028third') }}"))
    line = _one_line(_vlm_run(art, "--no-stream", "-n", "2"))
    assert line.isprintable() and "\\x1b[2J" in line


def test_two_threads_exporting_to_one_output(tmp_path):
    """The export lock holds within one process too (it was keyed on the pid)."""
    from vlmedge.export import artifact

    out = tmp_path / "out"
    with artifact.output_lock(out):
        errors = []

        def second():
            try:
                with artifact.output_lock(out):
                    pass
            except UserInputError as e:
                errors.append(str(e))
        t = threading.Thread(target=second)
        t.start()
        t.join(30)
        assert errors and f"pid {os.getpid()}" in errors[0]
    assert not (tmp_path / "out.lock").exists()
    with artifact.output_lock(out):  # free again
        pass


def test_lock_file_symlink_is_not_followed(tmp_path, secret):
    from vlmedge.export import artifact

    before = secret.read_bytes()
    (tmp_path / "out.lock").symlink_to(secret)
    with pytest.raises(UserInputError, match="cannot open the export lock"):
        with artifact.output_lock(tmp_path / "out"):
            pass
    assert secret.read_bytes() == before
