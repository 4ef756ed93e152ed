"""PaliGemma / PaliGemma 2 (PaliGemmaForConditionalGeneration: SigLIP + linear
projection, Gemma or Gemma 2 decoder, a prefix-LM with 1-based positions and
no chat template): tiny random-weight models export and validate; raw images
go through the runtime to the processor's pixels and ids and through
generate() to transformers' greedy tokens; the prompt's both-way block is
in the graph (the answer changes without it), a prompt's prefill is never
split at a cached prefix; grounding's <loc> answers parse."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from family_testing import (decoder_profiles_cover_groups,  # noqa: E402
                            export_trt_fp16_and_check, prefill_logits)
from family_testing import session as _session  # noqa: E402
from family_testing import torch_generate as _torch_generate  # noqa: E402
from test_families import _image, _text_config, _tokenizer  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import UnsupportedArchitectureError  # noqa: E402

QUESTION = "what color is the circle?"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<image>", "<unk>"]
SIZE, TOKENS, WINDOW = 32, 16, 10  # 32 px of 8 px patches: 16 image tokens


def build_paligemma(out, v2: bool = True, seed: int = 4):
    """SigLIP (2 layers) over 32 px images, 16 tokens, a linear projection; a
    2-layer decoder: Gemma 2 for PaliGemma 2 (one sliding layer of window 10,
    shorter than every prompt; attention and final logit soft-capping) or
    Gemma for PaliGemma. Untied head, random norm scales (seed 4: greedy
    answers that are not one repeated token). Saved like the checkpoints:
    SigLIP image processor with image_seq_length, no chat template."""
    from transformers import GenerationConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok, vocab = _tokenizer(SPECIAL, ["\n"] + scenes.vocabulary(boxes=False), bos_token="<bos>",
                            eos_token="<eos>", pad_token="<pad>",
                            extra_special_tokens={"image_token": "<image>"})
    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=8,
                  projection_dim=32)
    text = _text_config(vocab, bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
                        pad_token_id=vocab["<pad>"])
    text.update(num_hidden_layers=2, head_dim=8, tie_word_embeddings=False)
    if v2:
        text.update(model_type="gemma2", query_pre_attn_scalar=8, sliding_window=WINDOW,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                    layer_types=["sliding_attention", "full_attention"])
    else:
        text.update(model_type="gemma")
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text,
                          image_token_index=vocab["<image>"], projection_dim=32, hidden_size=32,
                          tie_word_embeddings=False)
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norm scales of a trained size, not the initial 1 + 0
        for name, p in model.model.language_model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<eos>"]],
                                               pad_token_id=vocab["<pad>"], do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip = SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, resample=3)
    ip.image_seq_length = TOKENS  # PaliGemmaProcessor reads it from the image processor
    ip.save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class":
                                                           "PaliGemmaProcessor"}))
    return out


@pytest.fixture(scope="module", params=["paligemma2", "paligemma"])
def built(request, tmp_path_factory):
    from vlmedge.export import exporter, loading

    src = build_paligemma(tmp_path_factory.mktemp(request.param), v2=request.param[-1] == "2")
    art = tmp_path_factory.mktemp(request.param + "_art") / "art"
    summary = exporter.run_export(exporter.ExportOptions(model_dir=src, output=art),
                                  log=lambda s: None)
    return request.param, src, art, summary, loading.load(src)


def test_exports_and_validates(built):
    name, _, art, summary, _ = built
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    assert v["max_abs_diff_logits"] <= 1e-4 and v["cached_vs_recompute_max_abs_diff"] <= 1e-4
    m = manifest.load(art)
    assert m.family == "paligemma" and m.image.expand == "repeat"
    assert m.decoder.attention_groups == "prompt" and m.decoder.sliding_window is None
    assert m.decoder.context_length == 512  # PaliGemma 2's window is in the graph
    # PaliGemma 2's sliding layers keep only the window in their cache
    assert (m.decoder.window_layers, m.decoder.window_cache) == (
        ((0,), WINDOW - 1) if name == "paligemma2" else ((), None))
    for p in m.validation["prompts"]:  # greedy output of the random model is not one token
        assert len(set(p["torch_text"].split())) > 3, p["torch_text"]


@pytest.mark.parametrize("size", [(100, 40), (40, 40), (300, 200)])
def test_raw_image_equals_processor_and_generate(size, built):
    """Pixels bit for bit, the prompt ids ("<image>" x 16 + <bos> + text +
    "\\n"), and greedy tokens = transformers' generate with its KV cache."""
    _, _, art, _, loaded = built
    s = _session(art)
    image = _image(*size)
    hf = loaded.family.hf_inputs(loaded.processor, image, QUESTION)
    pixels, _ = s.preprocess(image)
    np.testing.assert_array_equal(pixels, hf["pixel_values"].numpy())
    ids = hf["input_ids"][0].tolist()
    assert s.chat.prompt_ids(QUESTION) == ids
    assert ids[TOKENS] == s.chat.tokenizer.token_to_id("<bos>") and ids.count(3) == TOKENS
    want = _torch_generate(loaded, hf, 12, s.chat.stop_token_ids)
    assert s.generate(image, QUESTION, max_new_tokens=12).token_ids == want


def test_prefix_block_changes_the_answer(built):
    """With the prompt's tokens as causal (-1) the same graph drifts from
    PyTorch; with the prompt as one block it equals it."""
    _, _, art, _, loaded = built
    s = _session(art)
    hf = loaded.family.hf_inputs(loaded.processor, _image(100, 40), QUESTION)
    with torch.inference_mode():
        ref = loaded.model(**hf).logits[0, -1].numpy()
    ids = hf["input_ids"][0].tolist()
    feats = s.encode_image(hf["pixel_values"].numpy())
    assert np.abs(prefill_logits(s, ids, feats) - ref).max() <= 1e-4
    assert np.abs(prefill_logits(s, ids, feats, causal=True) - ref).max() > 1e-2


def test_ask_and_encoded_images_prefill_whole_prompts(built):
    """A prefix-LM prompt is never split at a cached prefix (its prefix's keys
    depend on every later prompt token): ask() and an EncodedImage answer as
    generate() does, and say nothing was reused."""
    _, _, art, _, _ = built
    s = _session(art)
    image = _image(100, 40)
    qs = [QUESTION, "how many shapes?"]
    want = [s.generate(image, q, max_new_tokens=6).token_ids for q in qs]
    answers = s.ask(image, qs, max_new_tokens=6)
    assert [a.token_ids for a in answers] == want
    assert all(a.timings["shared_tokens"] == 0 for a in answers)
    enc = s.encode(image)
    for q, w in zip(qs + qs, want + want):
        r = s.generate(enc, q, max_new_tokens=6)
        assert r.token_ids == w and r.timings["prefix_reused"] is False


def test_grounding_locations_parse_into_boxes(built):
    """PaliGemma's detection answer (<locYYYY> x4 per box, 0..1023 of the
    image) through the session's box reader."""
    from vlmedge.runtime import grounding

    _, _, art, _, _ = built
    conv = grounding.convention_for(_session(art).manifest.family)
    assert conv == "paligemma"
    (box,) = grounding.parse_boxes("<loc0256><loc0000><loc0768><loc1023> circle", conv,
                                   (200, 100))
    assert box.label == "circle"
    assert np.allclose((box.x1, box.y1, box.x2, box.y2),
                       (0.0, 25.0, 200 * 1023 / 1024, 75.0))


def test_unsupported_text_model_is_refused(built):
    from transformers import AutoConfig

    from vlmedge.export.families import family_for

    _, src, _, _, _ = built
    cfg = AutoConfig.from_pretrained(src)
    cfg.text_config.model_type = "llama"
    with pytest.raises(UnsupportedArchitectureError, match="language model") as e:
        family_for(cfg).check_config(cfg)
    assert "\n" not in str(e.value)


def test_int8_and_tensorrt_plan(tmp_path):
    """PaliGemma 2 through static QDQ int8 (synthetic calibration; the gate's
    figures in the summary), and a --target trt fp16 export that check-trt
    passes, its decoder profiles giving attention_groups the prompt's dims."""
    from vlmedge.export import exporter

    src = build_paligemma(tmp_path / "src")
    art = tmp_path / "int8"
    summary = exporter.run_export(exporter.ExportOptions(
        model_dir=src, output=art, precision="int8", calib="synthetic", calib_size=6,
        accuracy_target=0.85, calib_cache="off"), log=lambda s: None)
    assert summary["quantization"]["passed"], summary["quantization"]
    r = _session(art).generate(_image(100, 40), QUESTION, max_new_tokens=4)
    assert r.timings["image_tokens"] == TOKENS
    decoder_profiles_cover_groups(export_trt_fp16_and_check(src, tmp_path / "trt"))


@pytest.mark.parametrize("prompt,n", [("describe <image> please", 1),
                                      ("<image> and <image> : " + QUESTION, 2),
                                      (QUESTION, 2)])
def test_markers_and_several_images_equal_processor(prompt, n, built):
    """<image> markers keep their place and <bos> follows the last image, as
    PaliGemmaProcessor writes it (images first without markers); ids and
    greedy tokens equal transformers' for one and two images."""
    _, _, art, _, loaded = built
    s = _session(art)
    images = [_image(100, 40, seed=1), _image(40, 90, seed=2)][:n]
    text = prompt if "<image>" in prompt else "<image>" * n + prompt
    hf = dict(loaded.processor(images=[images], text=text, return_tensors="pt"))
    hf.pop("labels", None)
    grids = [None] * n
    assert s.chat.prompt_ids(prompt, image_grids=grids) == hf["input_ids"][0].tolist()
    want = _torch_generate(loaded, hf, 6, s.chat.stop_token_ids)
    assert s.generate(images, prompt, max_new_tokens=6).token_ids == want
