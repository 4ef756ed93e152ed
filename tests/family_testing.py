"""What the family test files (test_gemma3, test_paligemma, test_qwen3_vl) share:
transformers' reference tokens, a runtime run without torch, and a TensorRT
fp16 export checked by check-trt."""
import json
import subprocess
import sys
from pathlib import Path

from torch_blocker import PRELUDE


def module_fixtures(build, name: str):
    """The (src, artifact, loaded) module fixtures of a family test file: the tiny
    model `build(dir)` writes, its fp32 export (dir, summary) and the PyTorch side
    loaded as the exporter loads it. Assign them as module globals."""
    import pytest

    @pytest.fixture(scope="module")
    def src(tmp_path_factory):
        return build(tmp_path_factory.mktemp(f"tiny_{name}"))

    @pytest.fixture(scope="module")
    def artifact(src, tmp_path_factory):
        from vlmedge.export import exporter

        art = tmp_path_factory.mktemp(f"{name}_art") / f"tiny-{name}"
        return art, exporter.run_export(exporter.ExportOptions(model_dir=src, output=art),
                                        log=lambda s: None)

    @pytest.fixture(scope="module")
    def loaded(src):
        from vlmedge.export import loading
        return loading.load(src)

    return src, artifact, loaded


def prefill_logits(s, ids, feats, causal: bool = False):
    """The last position's logits of one prefill of `ids` (image rows from
    `feats`); causal: the decoder fed attention_groups -1 everywhere (no token
    attends ahead), the graph's masks otherwise (the session's prefill)."""
    import numpy as np

    if not causal:
        return s.prefill(ids, feats, s.empty_cache())[0]
    f = s.manifest.decoder
    feeds = {"inputs_embeds": s.embed_prompt(ids, feats),
             "attention_mask": np.ones((1, len(ids)), np.int64),
             "position_ids": np.arange(len(ids))[None],
             "attention_groups": np.full((1, len(ids)), -1, np.int64),
             **s.empty_cache().feeds(f.past_key, f.past_value)}
    return s.decoder.run(feeds)["logits"][0, -1]


def session(art):
    from vlmedge.runtime import VLMSession
    return VLMSession(art, provider="cpu", threads=1)


def torch_generate(loaded, hf: dict, n: int, stop_ids) -> list[int]:
    """transformers' generate (its own KV cache) on the processor's inputs,
    cut before the first stop token, as the runtime's generate() leaves it out."""
    import torch

    with torch.inference_mode():
        out = loaded.model.generate(**hf, max_new_tokens=n, do_sample=False)
    ref = out[0, hf["input_ids"].shape[1]:].tolist()
    stops = [i for i, t in enumerate(ref) if t in stop_ids]
    return ref[:stops[0]] if stops else ref


def generate_without_torch(art, image_path, question: str, n: int = 6) -> list[int]:
    """generate() in a fresh process where importing torch or transformers fails;
    returns its token ids (the process asserts neither was imported)."""
    code = f"""
{PRELUDE}import json
from vlmedge.runtime import VLMSession
s = VLMSession({str(art)!r}, provider='cpu', threads=1)
r = s.generate({str(image_path)!r}, {question!r}, max_new_tokens={n})
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print(json.dumps(r.token_ids))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_same_without_torch(art, image, tmp_path, question: str) -> None:
    """A raw image file through generate() in a process without torch gives the
    tokens this process's session gives."""
    path = tmp_path / "image.png"
    image.save(path)
    want = session(art).generate(str(path), question, max_new_tokens=6).token_ids
    assert generate_without_torch(art, path, question) == want


def export_trt_fp16_and_check(src, out) -> dict:
    """`vlm-export --target trt --precision fp16` through the CLI, then check-trt's
    static report on it (asserted passing); returns the manifest as JSON."""
    from vlmedge import manifest
    from vlmedge.export.trt import compat

    exe = str(Path(sys.executable).parent / "vlm-export")
    p = subprocess.run([exe, "--model", str(src), "--target", "trt", "--precision", "fp16",
                        "--output", str(out), "--max-context", "512", "--no-validate"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    rep = compat.check_path(out)
    assert rep.passed, compat.format_report(rep)
    return manifest.read_json(out)


def decoder_profiles_cover_groups(m: dict) -> None:
    """Each decoder profile gives attention_groups the dims of inputs_embeds'
    (batch, sequence)."""
    for prof in m["trt"]["plan"]["components"]["decoder"]["profiles"]:
        groups, embeds = prof["shapes"]["attention_groups"], prof["shapes"]["inputs_embeds"]
        assert [v[:2] for v in groups.values()] == [v[:2] for v in embeds.values()]
