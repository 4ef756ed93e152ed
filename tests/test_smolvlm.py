"""SmolVLM / SmolVLM2 (SmolVLMForConditionalGeneration): a tiny random-weight
model saved in the published layout (preprocessor_config.json,
processor_config.json, chat_template.jinja; no video processor config)
exports and validates against PyTorch; raw images go through the runtime's
idefics3 tiling and expansion to the HF processor's pixels and ids, and
generate() gives transformers' greedy tokens."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from test_families import _text_config, _tokenizer  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402

QUESTION = "what color is the circle?"

# SmolVLM2's published template: "User:<image>..." with an image first,
# "User: ..." for text only (the v1 tiny model's template has no such branch).
SMOLVLM2_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}"
    "{{ '<video>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_smolvlm(out):
    """SigLIP 64x64 tiles of 16x16 patches, scale 2 -> 4 tokens per tile;
    images resized to a 128 long side, split into up to 2x2 tiles + a global
    one. The tokenizer names its image tokens as SmolVLM2's does
    (extra_special_tokens), which is where SmolVLMProcessor reads them."""
    from transformers import (GenerationConfig, LlamaConfig, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil)

    rowcol = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    special = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>",
               "<fake_token_around_image>", "<image>", "<global-img>", "<video>"] + rowcol
    tok, vocab = _tokenizer(
        special, ["User", "Assistant", ":", "\n"] + scenes.vocabulary(boxes=False),
        bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<pad>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>",
                              "image_token": "<image>", "global_image_token": "<global-img>",
                              "end_of_utterance_token": "<end_of_utterance>"})
    # Seed 5: greedy answers that are neither a cycle nor hold an image token
    # (many ids of this 90-token vocabulary are special).
    torch.manual_seed(5)
    vision = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, image_size=64, patch_size=16)
    text = LlamaConfig(**_text_config(vocab, bos_token_id=vocab["<|im_start|>"],
                                      eos_token_id=vocab["<end_of_utterance>"],
                                      pad_token_id=vocab["<pad>"]))
    cfg = SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                        scale_factor=2, pad_token_id=vocab["<pad>"])
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<end_of_utterance>"]],
                                               pad_token_id=vocab["<pad>"], do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    SmolVLMImageProcessorPil(size={"longest_edge": 128}, max_image_size={"longest_edge": 64},
                             do_image_splitting=True, resample=1).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": 4, "processor_class": "SmolVLMProcessor"}))
    (out / "chat_template.jinja").write_text(SMOLVLM2_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def smolvlm_dir(tmp_path_factory):
    return build_smolvlm(tmp_path_factory.mktemp("tiny_smolvlm"))


@pytest.fixture(scope="module")
def loaded(smolvlm_dir):
    from vlmedge.export import loading
    return loading.load(smolvlm_dir)


@pytest.fixture(scope="module")
def artifact(smolvlm_dir, tmp_path_factory):
    """(artifact dir, export summary), exported once."""
    from vlmedge.export import exporter

    art = tmp_path_factory.mktemp("smolvlm_art") / "tiny-smolvlm-onnx-fp32"
    summary = exporter.run_export(exporter.ExportOptions(model_dir=smolvlm_dir, output=art),
                                  log=lambda s: None)
    return art, summary


@pytest.fixture(scope="module")
def session(artifact):
    from vlmedge.runtime import VLMSession
    return VLMSession(artifact[0], provider="cpu", threads=1)


def _image(w, h, seed=3):
    rng = np.random.default_rng(seed)
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf(proc, image, question=QUESTION, **kw):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    return proc(images=image, text=text, return_tensors="pt", **kw)


# -- loading and export ---------------------------------------------------------------

def test_family_and_image_only_processor(loaded):
    """Chosen by architecture; its processor is transformers' SmolVLMProcessor
    built without a video processor (torchvision) or num2words."""
    from transformers import SmolVLMProcessor

    assert loaded.family.name == "smolvlm"
    proc = loaded.processor
    assert isinstance(proc, SmolVLMProcessor) and not hasattr(proc, "video_processor")
    assert type(proc.image_processor).__name__.startswith("SmolVLMImageProcessor")
    assert proc.image_seq_len == 4 and proc.global_image_token == "<global-img>"


def test_exports_and_validates(artifact):
    art, summary = artifact
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    assert v["max_abs_diff_logits"] <= 1e-4 and v["max_abs_diff_image_features"] <= 1e-4
    assert v["cached_vs_recompute_max_abs_diff"] <= 1e-4
    m = manifest.load(art)
    assert m.family == "smolvlm" and set(summary["files"]) == set(m.files)
    assert m.decoder.position_ids == "1d"
    for p in m.validation["prompts"]:  # greedy output of the random model is not one token
        assert len(set(p["torch_text"].split())) > 2, p["torch_text"]
    # The runtime reads it as it reads Idefics3: the same tiling and expansion.
    raw = json.loads((art / "manifest.json").read_text())
    img, tiling = raw["image"], raw["preprocess"]["tiling"]
    assert img["expand"] == "idefics3" and img["image_seq_len"] == 4
    assert img["fake_image_token"] == "<fake_token_around_image>"
    assert img["global_image_token"] == "<global-img>"
    assert img["tile_token"].format(row=2, col=3) == "<row_2_col_3>"
    assert tiling == {"method": "idefics3", "longest_edge": 128, "tile_size": 64,
                      "do_image_splitting": True, "global_image": True}
    assert raw["preprocess"]["resample"] == "lanczos"


# -- raw images through the runtime ---------------------------------------------------

SIZES = [(128, 128), (300, 90), (50, 128), (20, 20)]  # (w, h): square, wide, tall, upscaled


@pytest.mark.parametrize("size", SIZES)
def test_runtime_preprocessing_and_prompt_equal_processor(size, loaded, session):
    """pixel_values (without the batch dim), tile grid and prompt ids as the
    HF processor's, bit for bit."""
    image = _image(*size)
    hf = _hf(loaded.processor, image)
    pixels, grid = session.preprocess(image)
    ref = hf["pixel_values"].numpy()[0]  # (1, N, 3, S, S) -> (N, 3, S, S)
    assert grid == loaded.family.image_grid(loaded.processor, image, hf)
    assert pixels.shape == ref.shape and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, ref)
    ids = hf["input_ids"][0].tolist()
    assert session.chat.prompt_ids(QUESTION, image_grid=grid) == ids
    assert ids.count(session.chat.image_token_id) == 4 * (grid[0] * grid[1] + 1)


def test_unsplit_and_text_only_prompts_equal_processor(loaded, session):
    """A (0, 0) grid is the global tile alone; a text-only prompt takes the
    template's other branch ("User: ...")."""
    proc = loaded.processor
    ref = _hf(proc, _image(128, 128), do_image_splitting=False)["input_ids"][0].tolist()
    assert session.chat.prompt_ids(QUESTION, image_grid=(0, 0)) == ref
    msgs = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.startswith("<|im_start|>User: ")
    ref = proc(text=text, return_tensors="pt")["input_ids"][0].tolist()
    assert session.chat.prompt_ids(QUESTION, with_image=False) == ref


# (w, h): square, wide and tall images whose 8 greedy tokens hold no image
# token (it would be taken for an image slot) and no early stop token.
GENERATE_SIZES = [(128, 128), (300, 90), (50, 128)]


@pytest.mark.parametrize("size", GENERATE_SIZES)
def test_generate_on_raw_image_equals_transformers(size, loaded, session):
    """session.generate on a raw image = transformers' model.generate
    (do_sample=False, its own KV cache) on the HF processor's inputs."""
    image = _image(*size)
    hf = dict(_hf(loaded.processor, image))
    with torch.inference_mode():
        out = loaded.model.generate(**hf, max_new_tokens=8, do_sample=False)
    ref = out[0, hf["input_ids"].shape[1]:].tolist()
    assert session.chat.image_token_id not in ref, ref
    stops = [i for i, t in enumerate(ref) if t in session.chat.stop_token_ids]
    want = ref[:stops[0]] if stops else ref
    r = session.generate(image, QUESTION, max_new_tokens=8)
    assert r.token_ids == want, (r.token_ids, ref)
    assert r.stop_reason == ("stop_token" if stops else "max_new_tokens")
    assert len(set(want)) > 2, want  # not a flat-logit cycle


# -- a family without a box convention ------------------------------------------
def test_vlm_run_annotate_refuses_family_without_boxes(artifact, tmp_path):
    """SmolVLM answers carry no boxes vlmedge reads: --annotate is refused in
    one line before any work, and a plain --json run reports no boxes."""
    import subprocess
    import sys
    from pathlib import Path

    vlm_run = str(Path(sys.executable).parent / "vlm-run")
    out = tmp_path / "out.png"
    r = subprocess.run([vlm_run, str(artifact[0]), "--annotate", str(out), "-n", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("vlm-run")]
    assert len(lines) == 1 and "carry no boxes vlmedge can read" in lines[0], r.stderr
    assert not out.exists()
    r = subprocess.run([vlm_run, str(artifact[0]), "--json", "-n", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["boxes"] == []
