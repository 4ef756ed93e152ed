"""The lean runtime on exported artifacts: generation without torch, parity
with PyTorch, KV cache = recompute, streaming, ask(), threads, bad input."""
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from torch_blocker import PRELUDE

from vlmedge.demo import scenes


def _bin(name):
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="session")
def tiny_session(tiny_llava_artifact):
    from vlmedge.runtime import VLMSession
    return VLMSession(tiny_llava_artifact[0], provider="cpu")


def test_generation_without_torch(tiny_llava_artifact):
    """Runs in a subprocess where importing torch or transformers fails."""
    art = tiny_llava_artifact[0]
    code = f"""
{PRELUDE}from vlmedge.runtime import VLMSession
from vlmedge.demo import scenes
s = VLMSession({str(art)!r}, provider='cpu')
r = s.generate(scenes.make_scene(5).image, 'describe the image.', max_new_tokens=6)
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print('ok', len(r.token_ids))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_kv_cached_equals_recompute(tiny_session):
    s = tiny_session
    img = scenes.make_scene(11).image
    ids = s.chat.prompt_ids("what color is the circle?")
    feats = s.encode_image(s.pixel_values(img))
    logits, cache = s.step(s.embed_prompt(ids, feats), s.empty_cache())
    toks = []
    for _ in range(8):
        t = int(np.argmax(logits))
        toks.append(t)
        logits, cache = s.step(s.embed_token(t), cache)
    full, _ = s.step(s.embed_prompt(ids + toks, feats), s.empty_cache())
    assert cache.length == len(ids) + len(toks)
    np.testing.assert_allclose(full, logits, atol=1e-4)


def test_generate_returns_text_ids_and_timings(tiny_session):
    r = tiny_session.generate(scenes.make_scene(3).image, "describe the image.", max_new_tokens=5)
    assert 0 < len(r.token_ids) <= 5
    assert r.text == tiny_session.chat.decode(r.token_ids)
    for k in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms", "tokens_per_s"):
        assert k in r.timings, k
    assert r.timings["ttft_ms"] >= r.timings["prefill_ms"]


def test_image_inputs_agree(tiny_session, tmp_path):
    """Path, bytes, PIL, RGB array and BGR array give the same pixel_values."""
    img = scenes.make_scene(9).image
    p = tmp_path / "x.png"
    img.save(p)
    rgb = np.asarray(img)
    ref = tiny_session.pixel_values(img).copy()  # the preprocessor reuses its output buffer
    for src, layout in ((p, "RGB"), (p.read_bytes(), "RGB"), (rgb, "RGB"),
                        (np.ascontiguousarray(rgb[..., ::-1]), "BGR")):
        np.testing.assert_array_equal(tiny_session.pixel_values(src, layout), ref)


def test_sampling_is_reproducible_with_seed(tiny_session):
    img = scenes.make_scene(4).image
    a = tiny_session.generate(img, "describe the image.", max_new_tokens=8, temperature=1.5,
                              top_p=0.95, seed=123)
    b = tiny_session.generate(img, "describe the image.", max_new_tokens=8, temperature=1.5,
                              top_p=0.95, seed=123)
    assert a.token_ids == b.token_ids


def test_stream_pieces_join_to_generate(tiny_session):
    img = scenes.make_scene(6).image
    pieces = list(tiny_session.stream(img, "describe the image.", max_new_tokens=8))
    assert "".join(pieces) == tiny_session.generate(img, "describe the image.",
                                                    max_new_tokens=8).text
    # Every piece is whole text: non-empty, and no U+FFFD from a character cut
    # between tokens (StreamDecoder holds such a piece back; see the next test).
    assert pieces and all(p and "\ufffd" not in p for p in pieces), pieces


def test_stream_decoder_holds_split_utf8():
    """A character whose bytes are split across byte-level tokens is held back."""
    from vlmedge.runtime.chat import StreamDecoder

    class ByteTok:  # decodes token i as byte i, like a byte-level BPE's fallback tokens
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    dec = StreamDecoder(ByteTok())
    out = [dec.push(b) for b in "añ€".encode()]
    assert out[0] == "a" and out[1] == "" and out[2] == "ñ"
    assert out[3] == "" and out[4] == "" and out[5] == "€"
    assert "".join(out) == "añ€"


def test_ask_reuses_prefix_and_matches_generate(tiny_session):
    img = scenes.make_scene(8).image
    qs = ["what color is the circle?", "describe the image.", "is there a red square?"]
    answers = tiny_session.ask(img, qs, max_new_tokens=6)
    assert [a.token_ids for a in answers] == \
        [tiny_session.generate(img, q, max_new_tokens=6).token_ids for q in qs]
    assert answers[0].timings["shared_tokens"] >= tiny_session.chat.tokens_per_image


def test_concurrent_sessions_match_serial(tiny_llava_artifact):
    from vlmedge.runtime import VLMSession

    imgs = [scenes.make_scene(s).image for s in range(6)]
    serial = VLMSession(tiny_llava_artifact[0], provider="cpu", threads=1)
    want = [serial.generate(i, "describe the image.", max_new_tokens=6).token_ids for i in imgs]
    got = [None] * len(imgs)

    def work(k):
        s = VLMSession(tiny_llava_artifact[0], provider="cpu", threads=1)
        for j in range(k, len(imgs), 2):
            got[j] = s.generate(imgs[j], "describe the image.", max_new_tokens=6).token_ids

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_context_overflow_is_clear_before_compute(tiny_session):
    from vlmedge.errors import ContextOverflowError

    with pytest.raises(ContextOverflowError, match="context length"):
        tiny_session.generate(scenes.make_scene(1).image, "describe the image.",
                              max_new_tokens=tiny_session.context_length)


@pytest.mark.parametrize("case", ["missing_image", "bad_image", "tampered", "newer_schema",
                                  "no_artifact"])
def test_vlm_run_bad_input_is_one_line(case, tiny_llava_artifact, tmp_path):
    import shutil

    art = tiny_llava_artifact[0]
    args = [art]
    if case == "missing_image":
        args += ["--image", tmp_path / "nope.jpg"]
    elif case == "bad_image":
        (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
        args += ["--image", tmp_path / "bad.jpg"]
    elif case in ("tampered", "newer_schema"):
        copy = tmp_path / "art"
        shutil.copytree(art, copy)
        if case == "tampered":
            data = bytearray((copy / "decoder.onnx.data").read_bytes())
            data[100] ^= 0xFF
            (copy / "decoder.onnx.data").write_bytes(bytes(data))
        else:
            m = json.loads((copy / "manifest.json").read_text())
            m["schema_version"] = 99
            (copy / "manifest.json").write_text(json.dumps(m))
        args = [copy]
    else:
        args = [tmp_path / "no-such-artifact"]
    r = subprocess.run([_bin("vlm-run"), *map(str, args), "--no-stream"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("vlm-run")]
    assert len(lines) == 1, r.stderr


def test_vlm_run_json(tiny_llava_artifact):
    r = subprocess.run([_bin("vlm-run"), str(tiny_llava_artifact[0]), "--json", "-n", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "text" in out and "ttft_ms" in out["timings"]


def test_decode_primitive_equals_generate_and_forces_length(tiny_session):
    """VLMSession.decode is the loop generate() runs; force_length (the
    benchmark's) masks stop tokens and yields exactly n tokens."""
    s = tiny_session
    img = scenes.make_scene(8).image
    want = s.generate(img, "describe the image.", max_new_tokens=12)
    enc = s.encode(img)
    ids = s.chat.prompt_ids("describe the image.")
    logits, cache = s.prefill(ids, enc.features, s.empty_cache())
    assert list(s.decode(logits, cache, 12)) == want.token_ids
    timings = {}
    forced = list(s.decode(logits, cache, 20, force_length=True, timings=timings))
    assert len(forced) == 20 and not set(forced) & set(s.chat.stop_token_ids)
    assert len(timings["decode_ms"]) == 19 and timings["kv_cache_bytes"] > 0


def test_cancel_stops_between_tokens(tiny_session):
    cancel = threading.Event()
    cancel.set()
    r = tiny_session.generate(scenes.make_scene(2).image, "describe the image.",
                              max_new_tokens=10, cancel=cancel)
    assert r.stop_reason == "cancelled" and r.token_ids == []
    pieces = []
    cancel = threading.Event()
    for p in tiny_session.stream(scenes.make_scene(2).image, "describe the image.",
                                 max_new_tokens=10, cancel=cancel):
        pieces.append(p)
        cancel.set()  # after the first piece
    assert len(pieces) == 1 and tiny_session.last_timings["stop_reason"] == "cancelled"


def test_session_feeds_the_float_dtype_its_decoder_records(tiny_llava_artifact):
    """The graphs' float dtype is the decoder's recorded inputs_embeds dtype:
    an int4-fp16 export gates its int4 weights while its graphs are still fp32
    (export/weight_only.py), and the session must feed them fp32."""
    from vlmedge import manifest
    from vlmedge.runtime import VLMSession

    art = tiny_llava_artifact[0]
    m = manifest.load(art).to_dict()
    m["precision"] = "int4-fp16"  # fp16 I/O by name; the graphs say float32
    s = VLMSession(art, provider="cpu", verify=False, manifest=m)
    assert s._dtype == np.float32
    r = s.generate(scenes.make_scene(7).image, "describe the image.", max_new_tokens=2)
    assert r.timings["new_tokens"] >= 1
