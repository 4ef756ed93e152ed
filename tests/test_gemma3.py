"""Gemma 3 (Gemma3ForConditionalGeneration: SigLIP + pooled projector, Gemma 3
decoder with sliding-window layers and bidirectional attention over each
image's tokens): a tiny random-weight model exports and validates; raw images
of several sizes go through the runtime to the processor's pixel_values (bit
for bit) and prompt ids, and through generate() to transformers' greedy
tokens with its own KV cache; the image blocks and the window are in the
graph (a test shows the answer changes without them). Several images in one
prompt, int8, the TensorRT plan and the refusals (pan-and-scan:
test_gemma3_pan_and_scan.py)."""
import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from family_testing import (decoder_profiles_cover_groups,  # noqa: E402
                            assert_same_without_torch, export_trt_fp16_and_check,
                            module_fixtures, prefill_logits)
from family_testing import session as _session  # noqa: E402
from family_testing import torch_generate as _torch_generate  # noqa: E402
from test_families import _hf_ids, _image, _text_config, _tokenizer  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import ModelDirError, UnsupportedArchitectureError  # noqa: E402

QUESTION = "what color is the circle?"
# Gemma 3's template, trimmed to what a user turn with images renders.
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
           "<end_of_image>", "<image_soft_token>", "<unk>"]
SIZE, TOKENS, WINDOW = 64, 16, 10  # 64 px -> 8 x 8 patches -> pooled 4 x 4


def build_gemma3(out, seed: int = 3, window: int = WINDOW):
    """SigLIP (2 layers) over 64 px images, pooled to 16 tokens; a 2-layer Gemma 3
    decoder, one sliding layer (window 10: every prompt is longer) and one
    global, untied head and random norm scales (seed 3: greedy answers that
    are not one repeated token). Saved like the checkpoints: tokenizer naming
    boi/eoi/image tokens, Gemma3 image processor, processor_config.json."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig
    from transformers.models.gemma3.image_processing_pil_gemma3 import (
        Gemma3ImageProcessorPil)

    tok, vocab = _tokenizer(SPECIAL, ["user", "model", "\n"] + scenes.vocabulary(boxes=False),
                            bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                            extra_special_tokens={"boi_token": "<start_of_image>",
                                                  "eoi_token": "<end_of_image>",
                                                  "image_token": "<image_soft_token>"})
    torch.manual_seed(seed)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=8)
    text = _text_config(vocab, bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
                        pad_token_id=vocab["<pad>"])
    text.update(num_hidden_layers=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=window,
                layer_types=["sliding_attention", "full_attention"])
    cfg = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=TOKENS,
                       boi_token_index=vocab["<start_of_image>"],
                       eoi_token_index=vocab["<end_of_image>"],
                       image_token_index=vocab["<image_soft_token>"], tie_word_embeddings=False)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norm scales of a trained size, not the initial 1 + 0, and a
        for name, p in model.model.language_model.named_parameters():  # projection that is
            if "norm" in name:                                         # not zeros (its init)
                p.normal_(0.0, 0.5)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]], pad_token_id=vocab["<pad>"],
        do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Gemma3ImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3).save_pretrained(out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma3Processor", "image_seq_length": TOKENS}))
    return out


SIZES = [(100, 40), (40, 40), (50, 128), (300, 200)]


src, artifact, loaded = module_fixtures(build_gemma3, "gemma3")


# -- export -------------------------------------------------------------------------

def test_exports_and_validates(artifact):
    art, summary = artifact
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    assert v["max_abs_diff_logits"] <= 1e-4 and v["max_abs_diff_image_features"] <= 1e-4
    m = manifest.load(art)
    assert m.family == "gemma3" and m.image.expand == "wrap"
    assert m.decoder.attention_groups and m.decoder.sliding_window is None
    assert m.decoder.context_length == 512  # not capped at the window: it is in the graph
    assert (m.image.image_start_token, m.image.image_end_token) == (
        "\n\n<start_of_image>", "<end_of_image>\n\n")
    assert m.image.tokens_per_image == TOKENS and m.preprocess["resize"] == "exact"
    for p in m.validation["prompts"]:  # greedy output of the random model is not one token
        assert len(set(p["torch_text"].split())) > 3, p["torch_text"]


def test_decoder_graph_takes_attention_groups(artifact):
    import onnx

    dec = onnx.load(str(artifact[0] / "decoder.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in dec.graph.input}
    assert dims["attention_groups"] == ["batch", "sequence_length"]
    assert dec.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.INT64


def test_window_layer_cache_holds_only_the_window(artifact):
    """Per-layer cache lengths: the sliding layer's past/present take their own
    dim and hold at most window - 1 rows however long the context; the global
    layer holds every position. (Answers still equal transformers' at every
    length: the generate tests run past the window.)"""
    import onnx

    m = manifest.load(artifact[0])
    assert m.decoder.window_layers == (0,) and m.decoder.window_cache == WINDOW - 1
    dec = onnx.load(str(artifact[0] / "decoder.onnx"), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(dec.graph.input) + list(dec.graph.output)}
    assert dims["past_key_values.0.key"][2] == "past_window_length"
    assert dims["present.0.value"][2] == "present_window_length"
    assert dims["past_key_values.1.key"][2] == "past_sequence_length"
    s = _session(artifact[0])
    image = _image(100, 40)
    pixels, grid = s.preprocess(image)
    ids = s.chat.prompt_ids(QUESTION, image_grid=grid)
    assert len(ids) > 2 * WINDOW
    logits, cache = s.prefill(ids, s.encode_image(pixels, grid), s.empty_cache(), grid)
    assert cache.length == len(ids)
    assert [a.shape[2] for a in cache.arrays] == [WINDOW - 1] * 2 + [len(ids)] * 2
    for n in range(3):  # decode steps keep the window's rows, the global layer grows
        logits, cache = s.prefill([int(np.argmax(logits))], None, cache, grid)
        assert [a.shape[2] for a in cache.arrays] == [WINDOW - 1] * 2 + [len(ids) + n + 1] * 2
    assert cache.length == len(ids) + 3
    # each layer's rows, as the manifest's window_layers / window_cache say
    for i in range(m.decoder.num_layers):
        want = min(cache.length, m.decoder.window_cache) if i in m.decoder.window_layers \
            else cache.length
        assert cache.arrays[2 * i].shape[2] == cache.arrays[2 * i + 1].shape[2] == want


@pytest.mark.parametrize("change,match", [
    (dict(window_cache=None), "window_cache"),          # layers listed, no row count
    (dict(window_layers=[0, 2]), "window_layers"),      # no layer 2 in a 2-layer decoder
    (dict(window_layers=[0, 0]), "window_layers"),      # twice
    (dict(attention_groups=None), "window_layers"),     # only the grouped graph cuts caches
    (dict(window_layers=[], window_cache=9), "window_cache")])
def test_window_layers_are_checked_when_read(artifact, change, match):
    from vlmedge.errors import ArtifactError

    m = manifest.read_json(artifact[0])
    m["decoder"].update(change)
    with pytest.raises(ArtifactError, match=match) as e:
        manifest.Manifest.from_dict(m)
    assert "\n" not in str(e.value)


def test_attention_groups_from_ids():
    from vlmedge.runtime.decoders import attention_groups

    ids = [1, 7, 7, 2, 3, 7, 7, 7, 4]
    np.testing.assert_array_equal(attention_groups("images", ids, 9, 0, 7),
                                  [[-1, 0, 0, -1, -1, 1, 1, 1, -1]])
    # a step of the last 4 ids: groups are numbered within the step (only equality counts)
    np.testing.assert_array_equal(attention_groups("images", ids, 4, 5, 7), [[0, 0, 0, -1]])
    np.testing.assert_array_equal(attention_groups("images", None, 1, 9, 7), [[-1]])
    # PaliGemma's prefix-LM: the first prefill is one block, anything after it causal
    np.testing.assert_array_equal(attention_groups("prompt", ids, 9, 0, 7), [[0] * 9])
    np.testing.assert_array_equal(attention_groups("prompt", ids[:2], 2, 9, 7), [[-1, -1]])


# -- the runtime on raw images --------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_runtime_preprocessing_equals_processor(size, artifact, loaded):
    s = _session(artifact[0])
    image = _image(*size)
    hf = _hf_ids(loaded.processor, image)
    pixels, grid = s.preprocess(image)
    assert grid is None
    np.testing.assert_array_equal(pixels, hf["pixel_values"].numpy())
    ids = hf["input_ids"][0].tolist()
    assert s.chat.prompt_ids(QUESTION) == ids
    assert ids.count(s.chat.image_token_id) == TOKENS


@pytest.mark.parametrize("size", [(100, 40), (40, 40), (300, 200)])
def test_generate_on_raw_image_equals_torch(size, artifact, loaded):
    """generate() on a raw image = transformers' generate with its KV cache:
    every answer is longer than the window, and the prompt's image block is
    attended both ways in the prefill."""
    s = _session(artifact[0])
    image = _image(*size)
    hf = dict(loaded.family.hf_inputs(loaded.processor, image, QUESTION))
    want = _torch_generate(loaded, hf, 12, s.chat.stop_token_ids)
    r = s.generate(image, QUESTION, max_new_tokens=12)
    assert r.token_ids == want
    assert len(hf["input_ids"][0]) > WINDOW


def test_image_block_and_window_change_the_answer(artifact, loaded):
    """The two masks are the model's: the same decoder fed plain causal groups
    (-1 everywhere) drifts from PyTorch's logits, and transformers itself
    with a full window answers otherwise; with the image groups the graph
    equals PyTorch."""
    s = _session(artifact[0])
    image = _image(100, 40)
    hf = dict(loaded.family.hf_inputs(loaded.processor, image, QUESTION))
    with torch.inference_mode():
        ref = loaded.model(**hf).logits[0, -1].numpy()
    ids = hf["input_ids"][0].tolist()
    feats = s.encode_image(hf["pixel_values"].numpy())
    assert np.abs(prefill_logits(s, ids, feats) - ref).max() <= 1e-4
    assert np.abs(prefill_logits(s, ids, feats, causal=True) - ref).max() > 1e-2
    cfg = loaded.model.config.text_config
    before = cfg.sliding_window
    cfg.sliding_window = 4096  # every layer sees the whole past
    try:
        with torch.inference_mode():
            wide = loaded.model(**hf).logits[0, -1].numpy()
    finally:
        cfg.sliding_window = before
    assert np.abs(wide - ref).max() > 1e-2


def test_several_images_equal_torch(artifact, loaded):
    """Two images, each its own block of both-way attention."""
    s = _session(artifact[0])
    a, b = _image(100, 40, seed=1), _image(40, 90, seed=2)
    q = "<image> is it like <image>?"
    content = [{"type": "image"}, {"type": "text", "text": " is it like "}, {"type": "image"},
               {"type": "text", "text": "?"}]
    text = loaded.processor.apply_chat_template([{"role": "user", "content": content}],
                                                add_generation_prompt=True)
    hf = dict(loaded.processor(images=[a, b], text=text, return_tensors="pt"))
    want = _torch_generate(loaded, hf, 8, s.chat.stop_token_ids)
    r = s.generate([a, b], q, max_new_tokens=8)
    assert r.token_ids == want
    assert r.timings["image_tokens"] == 2 * TOKENS


def test_raw_image_generation_without_torch(artifact, tmp_path):
    assert_same_without_torch(artifact[0], _image(100, 40), tmp_path, QUESTION)


def test_ask_reuses_the_prefix(artifact):
    """ask() prefills the shared prefix (image block included) once; each
    answer equals its own generate()."""
    s = _session(artifact[0])
    image = _image(100, 40)
    qs = [QUESTION, "how many shapes?"]
    answers = s.ask(image, qs, max_new_tokens=6)
    for q, a in zip(qs, answers):
        assert a.token_ids == s.generate(image, q, max_new_tokens=6).token_ids


# -- refusals, int8, TensorRT ---------------------------------------------------------

def test_ort_flavour_is_refused_in_one_line(src, tmp_path):
    exe = str(__import__("pathlib").Path(sys.executable).parent / "vlm-export")
    r = subprocess.run([exe, "--model", str(src), "--decoder-flavour", "ort",
                        "--output", str(tmp_path / "o"), "--no-validate"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("vlm-export: error")]
    assert len(lines) == 1 and "attention" in lines[0], r.stderr[-800:]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_embedding_model_config_is_refused(src):
    from transformers import AutoConfig

    from vlmedge.export.families import family_for

    cfg = AutoConfig.from_pretrained(src)
    cfg.text_config.use_bidirectional_attention = True
    with pytest.raises(UnsupportedArchitectureError, match="bidirectional") as e:
        family_for(cfg).check_config(cfg)
    assert "\n" not in str(e.value)


def test_int8_export_runs(src, tmp_path):
    from vlmedge.export import exporter

    art = tmp_path / "tiny-gemma3-int8"
    summary = exporter.run_export(exporter.ExportOptions(
        model_dir=src, output=art, precision="int8", calib="synthetic", calib_size=6,
        accuracy_target=0.85, calib_cache="off"), log=lambda s: None)
    q = summary["quantization"]
    assert q["passed"], q
    assert manifest.load(art).precision == "int8"
    r = _session(art).generate(_image(100, 40), QUESTION, max_new_tokens=4)
    assert r.timings["image_tokens"] == TOKENS


def test_check_trt_on_fp16_trt_export(src, tmp_path):
    decoder_profiles_cover_groups(export_trt_fp16_and_check(src, tmp_path / "trt-fp16"))
