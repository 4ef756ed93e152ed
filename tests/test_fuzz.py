"""Fuzzing the runtime's untrusted inputs (issue 12) with hypothesis.

Targets: manifests mutated from a real one (values replaced by hostile ones,
keys deleted or added), image bytes mutated from real PNG/JPEG/WebP files and
numpy arrays of arbitrary dtype and shape, prompts of arbitrary Unicode (lone
surrogates, control characters, special-token text), and sampling options of
any type and value.

Property: every case ends in a result or a vlmedge error, never another
exception (a traceback for the user), never a hang (the timeout below), and
never a read outside the artifact: an audit hook sees every file Python opens
while a case runs, and none may lie in the directory beside the artifact that
holds a planted secret. (Native code only ever gets paths that passed the
containment check; tests/test_trust.py checks that path with strace.)

Bounded for CI (about a minute); VLMEDGE_FUZZ_EXAMPLES=5000 runs longer,
with a random seed, locally. The counts are printed at the end of the run.
"""
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fuzz_stats
from vlmedge.demo import scenes
from vlmedge.errors import VlmedgeError

EXAMPLES = int(os.environ.get("VLMEDGE_FUZZ_EXAMPLES", "0"))
LONG = EXAMPLES > 0


def _settings(default: int):
    return settings(max_examples=EXAMPLES or default, deadline=None, database=None,
                    derandomize=not LONG, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.timeout(3600 if LONG else 600)


# -- watching every open ---------------------------------------------------------

class _Audit:
    """Records the paths Python opens while `active` (sys.addaudithook cannot be
    removed, so it stays installed and idle between cases)."""

    def __init__(self):
        self.active = False
        self.opened: list[str] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if self.active and event == "open" and args and isinstance(args[0], (str, bytes,
                                                                                os.PathLike)):
            self.opened.append(os.path.realpath(os.fsdecode(args[0])))


_AUDIT = _Audit()


@pytest.fixture(scope="module")
def world(tiny_llava_artifact, tmp_path_factory):
    """An artifact copy, and beside it a directory with a secret nothing may read."""
    root = tmp_path_factory.mktemp("fuzz")
    art = root / "art"
    shutil.copytree(tiny_llava_artifact[0], art)
    outside = root / "outside"
    outside.mkdir()
    secret = outside / "secret.onnx"
    shutil.copy(art / "vision.onnx", secret)  # a graph: the most tempting thing to run
    (outside / "tokenizer.json").write_bytes((art / "tokenizer.json").read_bytes())
    base = json.loads((art / "manifest.json").read_text())
    from vlmedge.manifest import file_entry
    e = file_entry(secret)
    return {"art": art, "outside": os.path.realpath(outside), "secret": secret, "base": base,
            "secret_sha": e["sha256"], "secret_size": e["bytes"]}


def _case(target: str, fn, world):
    """Runs one case: a result or a VlmedgeError, and no open outside the artifact."""
    _AUDIT.opened.clear()
    _AUDIT.active = True
    try:
        fn()
        outcome = "ok"
    except VlmedgeError as e:
        outcome = type(e).__name__
        assert str(e).isprintable(), str(e)  # one line at the CLI, no terminal controls
    finally:
        _AUDIT.active = False
    leaked = [p for p in _AUDIT.opened if p.startswith(world["outside"] + os.sep)]
    assert not leaked, f"read outside the artifact: {leaked}"
    fuzz_stats.record(target, outcome)


# -- manifests -----------------------------------------------------------------------

def _paths(node, prefix=()):
    """Every key path of a JSON tree: dict keys and list indexes."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _hostile_names(world):
    secret = str(world["secret"])
    return st.sampled_from([
        secret, "../outside/secret.onnx", "../outside/tokenizer.json", "/etc/passwd",
        "a/../../outside/secret.onnx", "./vision.onnx", "vision.onnx/", "", ".", "..",
        "C:\\\\x.onnx", "evil.onnx", "vision.onnx\x00.txt", "tokenizer.json",
        "vision.onnx.data", "decoder.onnx", "manifest.json", "..\\\\outside\\\\secret.onnx"])


def _json_values(world):
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
        st.sampled_from([0, 1, -1, 2, 10 ** 6, 10 ** 9, 2 ** 31, 2 ** 63]),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
        st.sampled_from(["{i}", "{i.__class__}", "{0}", "{{ x", "{% for %}", "last", "mrope",
                         "1d", "int8", "trt", "qwen2_vl", "idefics3", "0" * 64]),
        _hostile_names(world))
    return st.recursive(scalars, lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=3)),
        max_leaves=12)


HOSTILE_TEMPLATES = [
    "", "{% if false %}{% endif %}", "{{ 'x' * 10**13 }}", "{{ 2 ** 100000 }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__ }}",
    "{{ raise_exception('\x1b[2J boom') }}", "{% for m in messages %}{{ m['content'] }}",
    "{{ messages[0]['content'][0]['type'] }} <image> {{ messages[0]['content'][1]['text'] }}",
    "{{ bos_token }}<user> <image> {{ messages[0]['content'][1]['text'] }} <end><assistant>",
    "{{ self.__init__ }}", "{% set x = namespace(a=1) %}{{ x.a }}<image>",
    "{{ lipsum(100000) }}", "{{ '%s' % ('x' * 100000) }}"]


@st.composite
def mutated_manifest(draw, world):
    m = json.loads(json.dumps(world["base"]))
    paths = list(_paths(m))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "file", "template"]))
        if op == "file" and isinstance(m, dict) and isinstance(m.get("files"), dict):
            # a hostile name listed with a real entry (or the secret's own hash)
            entry = draw(st.sampled_from([{"sha256": world["secret_sha"],
                                           "bytes": world["secret_size"]},
                                          {"sha256": "0" * 64, "bytes": 1}]))
            m["files"][draw(_hostile_names(world))] = entry
            continue
        if op == "template" and isinstance(m, dict) and isinstance(m.get("tokenizer"), dict):
            m["tokenizer"]["chat_template"] = draw(st.sampled_from(HOSTILE_TEMPLATES))
            continue
        parent, key = (None, None) if not path else (_get(m, path[:-1]), path[-1])
        if op == "replace" or parent is None:
            value = draw(_json_values(world))
            if parent is None:
                m = value if isinstance(value, dict) or draw(st.booleans()) else m
            elif _exists(parent, key):
                parent[key] = value
        elif op == "delete" and isinstance(parent, dict) and key in parent:
            del parent[key]
        elif op == "add":
            target = _get(m, path) if isinstance(_get(m, path), dict) else parent
            if isinstance(target, dict):
                target[draw(st.text(min_size=1, max_size=8))] = draw(_json_values(world))
        paths = list(_paths(m)) if isinstance(m, (dict, list)) else [()]
    return m


def _get(node, path):
    for k in path:
        if isinstance(node, dict) and k in node:
            node = node[k]
        elif isinstance(node, list) and isinstance(k, int) and k < len(node):
            node = node[k]
        else:
            return None
    return node


def _exists(parent, key):
    return (isinstance(parent, dict) and key in parent) or \
        (isinstance(parent, list) and isinstance(key, int) and key < len(parent))


def test_fuzz_manifests(world):
    from vlmedge.runtime import VLMSession

    image = scenes.make_scene(7).image
    path = world["art"] / "manifest.json"

    @_settings(150)
    @given(m=mutated_manifest(world))
    def case(m):
        path.write_text(json.dumps(m, allow_nan=True))

        def run():
            s = VLMSession(world["art"], provider="cpu", threads=1)
            s.generate(image, "what color is the circle?", max_new_tokens=2)
        _case("manifests", run, world)

    try:
        case()
    finally:
        path.write_text(json.dumps(world["base"]))


# -- graph bytes: the external-data reader (vlmedge/onnx_refs.py) ------------------------------

def test_fuzz_graph_bytes(world):
    """The stdlib protobuf walker on mutated graphs: a result or OnnxParseError,
    never another exception, never slow."""
    from vlmedge.onnx_refs import OnnxParseError, scan

    base = (world["art"] / "embed.onnx").read_bytes()

    @_settings(300)
    @given(flips=st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)),
                          max_size=8),
           cut=st.integers(0, len(base)), junk=st.binary(max_size=32))
    def case(flips, cut, junk):
        data = bytearray(base)
        for pos, value in flips:
            data[pos] = value
        data = bytes(data[:cut]) + junk
        try:
            scan(data)
            outcome = "ok"
        except OnnxParseError:
            outcome = "OnnxParseError"
        fuzz_stats.record("graph bytes", outcome)
    case()


# -- images ------------------------------------------------------------------------------

def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    scenes.make_scene(3).image.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


BASES = {fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "WEBP", "BMP", "GIF")}


@st.composite
def mutated_bytes(draw):
    data = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "splice"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=16))
        elif op == "splice" and data:
            n = draw(st.integers(1, 32))
            data[pos:pos + n] = draw(st.binary(min_size=n, max_size=n))
    return bytes(data)


@pytest.fixture(scope="module")
def session(world):
    from vlmedge.runtime import VLMSession
    return VLMSession(world["art"], provider="cpu", threads=1)


def test_fuzz_image_bytes(session, world):
    @_settings(200)
    @given(data=st.one_of(mutated_bytes(), st.binary(max_size=64)))
    def case(data):
        _case("image bytes", lambda: session.generate(data, "describe the image.",
                                                      max_new_tokens=2), world)
    case()


def test_fuzz_image_arrays(session, world):
    shapes = st.one_of(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40),
                       st.sampled_from([(1, 50_000, 3), (50_000, 1, 3), (0, 0, 3), (2, 2, 3, 1),
                                        (3, 3, 4), (64, 64, 3)]))
    dtypes = st.sampled_from([np.uint8, np.float32, np.int64, np.bool_, np.uint16])

    @_settings(150)
    @given(array=hnp.arrays(dtypes, shapes), layout=st.sampled_from(["RGB", "BGR", "rgb", 3]))
    def case(array, layout):
        _case("image arrays", lambda: session.generate(array, "describe the image.",
                                                       max_new_tokens=2, layout=layout), world)
    case()


# -- prompts and sampling options ------------------------------------------------------------

SPECIAL = ["<image>", "<s>", "</s>", "<pad>", "<unk>", "<user>", "<assistant>", "<end>",
           "<|im_end|>", "<|image_pad|>", "{{ bos_token }}", "{% raw %}", "\x00", "\r\n",
           "\u202e", "\ufeff", "\udcff", "\ud800", "A" * 3000]
prompts = st.lists(st.one_of(st.text(max_size=20),
                             st.text(alphabet=st.characters(min_codepoint=0xD800,
                                                            max_codepoint=0xDFFF), max_size=3),
                             st.sampled_from(SPECIAL)), max_size=6).map("".join)


def test_fuzz_prompts(session, world):
    image = scenes.make_scene(4).image

    @_settings(200)
    @given(prompt=prompts, with_image=st.booleans())
    def case(prompt, with_image):
        def run():
            session.generate(image if with_image else None, prompt, max_new_tokens=2)
            "".join(session.stream(image if with_image else None, prompt, max_new_tokens=2))
        _case("prompts", run, world)
    case()


def _anything(*extra):
    return st.one_of(st.none(), st.booleans(), st.integers(-3, 2 ** 70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                     st.lists(st.text(max_size=3), max_size=3), *extra)


def test_fuzz_sampling_options(session, world):
    image = scenes.make_scene(5).image
    options = st.fixed_dictionaries({}, optional={
        "temperature": _anything(st.floats(0, 3), st.sampled_from([1e-300, 5e-324, 1e300])),
        "top_k": _anything(st.integers(1, 60)),
        "top_p": _anything(st.floats(0, 1)),
        "repetition_penalty": _anything(st.floats(0.1, 3), st.sampled_from([1e-300, 1e300])),
        "max_new_tokens": _anything(st.integers(1, 6)),
        "seed": _anything(st.integers(0, 2 ** 64)),
        "stop": _anything(),
        "layout": st.sampled_from(["RGB", "BGR", "xyz", None]),
    })

    @_settings(200)
    @given(opts=options)
    def case(opts):
        def run():
            session.generate(image, "describe the image.", **opts)
        _case("sampling options", run, world)
    case()
