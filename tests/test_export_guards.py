"""Export-side guards (issue 12): sliding-window decoders are served only
within their window; unsupported LLaVA towers and processors that need a
missing package are refused in one line; validation never feeds a generated
image token back as an image slot; custom code that will not run is named;
corrupt checkpoints give one line naming the file."""
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from vlmedge.errors import (ContextOverflowError, MissingDependencyError,  # noqa: E402
                            ModelDirError, UnsupportedArchitectureError)

QUIET = dict(log=lambda s: None)


def _export(src: Path, out: Path, **kw):
    from vlmedge.export import exporter
    return exporter.run_export(exporter.ExportOptions(model_dir=src, output=out, **kw), **QUIET)


def _tiny_llava(out: Path, text_config=None, vision_config=None) -> Path:
    """The conftest tiny LLaVA (demo tokenizer/processor), with another text
    or vision config where given."""
    from transformers import LlavaForConditionalGeneration

    from vlmedge.demo import build

    torch.manual_seed(0)
    cfg = build.make_config("tiny")
    cfg.text_config.initializer_range = 0.2
    if text_config is not None:
        cfg.text_config = text_config
    if vision_config is not None:
        cfg.vision_config = vision_config
    build.save_model_dir(LlavaForConditionalGeneration(cfg).eval(), out)
    return out


def _mistral_text(window: int):
    """The tiny LLaVA's Llama text config as a Mistral one with a sliding window."""
    from transformers import MistralConfig

    from vlmedge.demo import build

    t = build.make_config("tiny").text_config
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")
    return MistralConfig(**{k: getattr(t, k) for k in keep}, sliding_window=window,
                         initializer_range=0.2)


def _manifest(art: Path) -> dict:
    """manifest.json as written (the raw dict, not the runtime's typed view)."""
    return json.loads((art / "manifest.json").read_text())


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


# -- 1. sliding-window decoders ---------------------------------------------------------

def _family_window(text_config):
    from vlmedge.export.families import Llava
    model = types.SimpleNamespace(config=types.SimpleNamespace(text_config=text_config))
    return Llava().sliding_window(model), Llava().max_context(model)


def test_effective_sliding_window_from_configs():
    from transformers import Gemma2Config, MistralConfig, Qwen2Config

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    assert _family_window(MistralConfig(**small, sliding_window=16)) == (16, 16)
    assert _family_window(MistralConfig(**small, sliding_window=None)) == (None, 512)
    # Qwen2 carries a window it does not use unless use_sliding_window.
    assert _family_window(Qwen2Config(**small, sliding_window=16,
                                      use_sliding_window=False)) == (None, 512)
    plain = types.SimpleNamespace(sliding_window=16, use_sliding_window=False,
                                  max_position_embeddings=512)
    assert _family_window(plain) == (None, 512)
    # Gemma2 alternates sliding and full layers: the sliding ones bound it.
    assert _family_window(Gemma2Config(**small, head_dim=8, sliding_window=8)) == (8, 8)
    assert _family_window(Gemma2Config(**small, head_dim=8, sliding_window=8,
                                       layer_types=["full_attention"] * 2)) == (None, 512)


def test_sliding_window_model_served_within_its_window(tmp_path):
    from vlmedge.runtime import VLMSession

    src = _tiny_llava(tmp_path / "src", text_config=_mistral_text(48))
    summary = _export(src, tmp_path / "art")
    assert summary["validation"]["passed"], summary["validation"]
    m = _manifest(tmp_path / "art")
    assert m["decoder"]["context_length"] == 48 and m["decoder"]["sliding_window"] == 48
    s = VLMSession(tmp_path / "art", provider="cpu", threads=1)
    assert s.generate(None, "describe the image.", max_new_tokens=4).text is not None
    with pytest.raises(ContextOverflowError):  # past the window it would answer wrong
        s.generate(None, "describe the image.", max_new_tokens=48)


def test_window_smaller_than_image_prompt_is_one_clear_error(tmp_path):
    src = _tiny_llava(tmp_path / "src", text_config=_mistral_text(16))
    with pytest.raises(ModelDirError, match="sliding window") as e:
        _export(src, tmp_path / "art")
    assert "16" in _one_line(e.value)
    assert not (tmp_path / "art").exists()
    # Without validation it exports, capped at the window.
    _export(src, tmp_path / "art2", validate=False)
    d = _manifest(tmp_path / "art2")["decoder"]
    assert d["context_length"] == 16 and d["sliding_window"] == 16


def test_full_attention_model_has_no_window(tiny_llava_artifact):
    d = _manifest(tiny_llava_artifact[0])["decoder"]
    assert "sliding_window" in d and d["sliding_window"] is None


# -- 2. unsupported LLaVA towers, processors needing a missing package ------------------------

def test_llava_with_pixtral_tower_is_refused(tmp_path):
    from transformers import PixtralVisionConfig

    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=16, image_size=128, patch_size=32)
    src = _tiny_llava(tmp_path / "src", vision_config=vision)
    with pytest.raises(UnsupportedArchitectureError, match="pixtral") as e:
        _export(src, tmp_path / "art")
    msg = _one_line(e.value)
    assert "clip_vision_model" in msg and "siglip_vision_model" in msg
    assert not (tmp_path / "art").exists()


def test_processor_needing_missing_package_is_one_line(tiny_llava_dir, monkeypatch):
    import transformers

    from vlmedge.export import loading

    def needs_torchvision(*a, **kw):
        raise ImportError("CLIPImageProcessorFast requires the Torchvision library but it was "
                          "not found in your environment.\nInstall it with pip.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    with pytest.raises((MissingDependencyError, ModelDirError), match="Torchvision") as e:
        loading.load(tiny_llava_dir)
    assert str(tiny_llava_dir) in _one_line(e.value)


# -- 3. a generated image token is never fed back in validation ----------------------------

def test_qwen2_vl_validation_stops_at_generated_image_token(tmp_path):
    """The image token's LM-head row scaled 1.8x: for "what color is the
    circle?" its logit goes from 1.97 (argmax 2.66) to ~3.5 at the second
    step (the first: 2.2 against 3.0), so the reference generates it."""
    from test_families import build_qwen2_vl
    from transformers import Qwen2VLForConditionalGeneration

    src = build_qwen2_vl(tmp_path / "src")
    model = Qwen2VLForConditionalGeneration.from_pretrained(src).eval()
    with torch.no_grad():
        model.lm_head.weight[model.config.image_token_id] *= 1.8
    model.save_pretrained(src)
    v = _export(src, tmp_path / "art", validate=True)["validation"]
    assert v["passed"] and v["tokens_match"], v
    prompts = _manifest(tmp_path / "art")["validation"]["prompts"]
    assert all(isinstance(p["stopped_at_image_token"], bool) for p in prompts)
    assert any(p["stopped_at_image_token"] for p in prompts), prompts


# -- 4. custom code that will not run ------------------------------------------------------

def test_auto_map_without_trust_remote_code_warns(tiny_llava_dir, tmp_path, capsys):
    from vlmedge.export import loading

    loading.load(tiny_llava_dir)
    assert "vlmedge: warning" not in capsys.readouterr().err  # nothing custom: no warning
    d = tmp_path / "custom"
    shutil.copytree(tiny_llava_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageTextToText": "modeling_x.XForConditionalGeneration"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_x.py").write_text("raise SystemExit('custom code must not run')\n")
    loading.load(d)
    lines = [x for x in capsys.readouterr().err.splitlines() if "vlmedge: warning:" in x]
    assert len(lines) == 1 and lines[0].startswith("vlmedge: warning:"), lines
    assert "modeling_x.XForConditionalGeneration" in lines[0] and "modeling_x.py" in lines[0]
    assert "--trust-remote-code" in lines[0] and "built-in" in lines[0]


# -- 5. corrupt checkpoints ----------------------------------------------------------------

def test_truncated_safetensors_is_one_line_naming_the_file(tiny_llava_dir, tmp_path):
    from vlmedge.export import loading

    d = tmp_path / "trunc"
    shutil.copytree(tiny_llava_dir, d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ModelDirError, match="model.safetensors") as e:
        loading.load(d)
    _one_line(e.value)
    # The CLI: exit status 2, one error line, no traceback.
    exe = str(Path(sys.executable).parent / "vlm-export")
    r = subprocess.run([exe, "--model", str(d), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    errors = [x for x in r.stderr.splitlines() if x.startswith("vlm-export: error:")]
    assert r.returncode == 2 and len(errors) == 1 and "model.safetensors" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_garbage_pickle_checkpoint_is_one_line_naming_the_file(tiny_llava_dir, tmp_path):
    from vlmedge.export import loading

    d = tmp_path / "pickle"
    shutil.copytree(tiny_llava_dir, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"garbage, not a checkpoint" * 50)
    with pytest.raises(ModelDirError, match="pytorch_model.bin") as e:
        loading.load(d, allow_pickle=True)
    _one_line(e.value)
