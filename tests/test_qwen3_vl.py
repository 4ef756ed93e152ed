"""Qwen3-VL (Qwen3VLForConditionalGeneration: 16 px patches with a learned
position table resampled to each grid, deepstack features added to the first
decoder layers, interleaved mrope): a tiny random-weight model exports and
validates; the host's grid inputs equal transformers'; raw images of several
sizes, and several images in one prompt, go through generate() to
transformers' greedy tokens; the deepstack features are in the graph (the
answer changes without them); int8, the TensorRT plan and the refusals."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from family_testing import (export_trt_fp16_and_check,  # noqa: E402
                            assert_same_without_torch, module_fixtures)
from family_testing import session as _session  # noqa: E402
from family_testing import torch_generate as _torch_generate  # noqa: E402
from test_families import QWEN_TEMPLATE, _hf_ids, _image, _text_config, _tokenizer  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import UnsupportedArchitectureError  # noqa: E402

QUESTION = "what color is the circle?"
DEEPSTACK = 2  # deepstack features from both tower blocks: decoder layers 0 and 1


def build_qwen3_vl(out, seed: int = 0):
    """8 px patches, 2x2 merge, images up to 64x64 pixels (an 8x8 patch grid,
    16 image tokens); a 4x4 learned position table (resampled to every grid);
    2 tower blocks, each feeding a deepstack merger; a 3-layer decoder with
    interleaved mrope sections (2, 1, 1) of head_dim 8. Saved like
    build_qwen2_vl (no processor config: the family builds an image-only
    processor without torchvision)."""
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]
    tok, vocab = _tokenizer(special, ["user", "assistant", "\n"] + scenes.vocabulary(boxes=False),
                            eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            extra_special_tokens={"image_token": "<|image_pad|>",
                                                  "video_token": "<|video_pad|>"})
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                  num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    text = _text_config(vocab, rope_parameters=rope, bos_token_id=None,
                        eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])
    text.update(num_hidden_layers=3, head_dim=8)
    cfg = Qwen3VLConfig(vision_config=vision, text_config=text,
                        image_token_id=vocab["<|image_pad|>"],
                        video_token_id=vocab["<|video_pad|>"],
                        vision_start_token_id=vocab["<|vision_start|>"],
                        vision_end_token_id=vocab["<|vision_end|>"], tie_word_embeddings=False)
    model = Qwen3VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # a position table of a trained size, not ~0
        model.model.visual.pos_embed.weight.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<|im_end|>"]],
                                               pad_token_id=vocab["<|endoftext|>"],
                                               do_sample=False)
    Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                             min_pixels=16 * 16, max_pixels=64 * 64, image_mean=[0.5] * 3,
                             image_std=[0.5] * 3).save_pretrained(out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return out


src, artifact, loaded = module_fixtures(build_qwen3_vl, "qwen3_vl")


def test_exports_and_validates(artifact):
    art, summary = artifact
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    assert v["max_abs_diff_logits"] <= 1e-4 and v["max_abs_diff_image_features"] <= 1e-4
    m = manifest.load(art)
    assert m.family == "qwen3_vl" and m.image.expand == "qwen2_vl"
    assert m.decoder.position_ids == "mrope" and m.decoder.deepstack_layers == DEEPSTACK
    assert m.image.feature_dim == m.decoder.inputs_width == 32 * (1 + DEEPSTACK)
    assert m.image.vision_grid_inputs == ("vision_position_ids", "interp_indices",
                                          "interp_weights")
    assert m.image.position_grid_side == 4
    for p in m.validation["prompts"]:  # greedy output of the random model is not one token
        assert len(set(p["torch_text"].split())) > 3, p["torch_text"]


@pytest.mark.parametrize("grid", [(1, 8, 8), (1, 2, 14), (1, 6, 4), (1, 2, 2), (2, 4, 6),
                                  (1, 40, 2)])
def test_position_table_taps_equal_transformers(grid):
    """The host's bilinear taps into the 4x4 table (and a 48x48 one, the real
    models') equal transformers' vision_utils, indices exactly, weights to
    float32 rounding."""
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    from vlmedge.runtime import mrope

    for side in (4, 48):
        ref_i, ref_w = get_vision_interpolation_indices_and_weights(
            torch.tensor([grid]), side, mode="bilinear", align_corners=True,
            spatial_merge_size=2)
        idx, w = mrope.vision_interpolation(grid, 2, side)
        np.testing.assert_array_equal(idx, ref_i.numpy())
        assert w.dtype == np.float32
        np.testing.assert_allclose(w, ref_w.numpy(), atol=1e-6)


@pytest.mark.parametrize("size", [(128, 128), (200, 64), (40, 120), (20, 20)])
def test_raw_image_equals_processor_and_generate(size, artifact, loaded):
    """Patches bit for bit, prompt ids, image features (deepstack included)
    and greedy tokens = transformers' on the processor's inputs."""
    s = _session(artifact[0])
    image = _image(*size)
    hf = dict(_hf_ids(loaded.processor, image))
    pixels, grid = s.preprocess(image)
    assert grid == tuple(hf["image_grid_thw"][0].tolist())
    np.testing.assert_array_equal(pixels, hf["pixel_values"].numpy())
    assert s.chat.prompt_ids(QUESTION, image_grid=grid) == hf["input_ids"][0].tolist()
    with torch.inference_mode():
        ref = loaded.family.torch_image_features(loaded.model, hf).numpy()
    np.testing.assert_allclose(s.encode_image(pixels, grid), ref, atol=1e-4)
    want = _torch_generate(loaded, hf, 10, s.chat.stop_token_ids)
    assert s.generate(image, QUESTION, max_new_tokens=10).token_ids == want


def test_deepstack_changes_the_answer(artifact, loaded):
    """Zeroing the deepstack columns of the image tokens' inputs moves the
    logits far from PyTorch's; with them the graph equals PyTorch."""
    s = _session(artifact[0])
    image = _image(128, 128)
    hf = dict(_hf_ids(loaded.processor, image))
    with torch.inference_mode():
        ref = loaded.model(**hf).logits[0, -1].numpy()
    ids = hf["input_ids"][0].tolist()
    grid = tuple(hf["image_grid_thw"][0].tolist())
    feats = s.encode_image(hf["pixel_values"].numpy(), grid)
    logits, _ = s.prefill(ids, feats, s.empty_cache(), grid)
    assert np.abs(logits - ref).max() <= 1e-4
    flat = feats.copy()
    flat[..., 32:] = 0.0
    plain, _ = s.prefill(ids, flat, s.empty_cache(), grid)
    assert np.abs(plain - ref).max() > 1e-2


def test_several_images_equal_torch(artifact, loaded):
    s = _session(artifact[0])
    a, b = _image(100, 40, seed=1), _image(40, 90, seed=2)
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    text = loaded.processor.apply_chat_template([{"role": "user", "content": content}],
                                                add_generation_prompt=True)
    hf = dict(loaded.processor(images=[a, b], text=text, return_tensors="pt"))
    want = _torch_generate(loaded, hf, 8, s.chat.stop_token_ids)
    r = s.generate([a, b], QUESTION, max_new_tokens=8)
    assert r.token_ids == want
    assert r.timings["image_tokens"] == hf["input_ids"].eq(s.chat.image_token_id).sum().item()


def test_generation_without_torch(artifact, tmp_path):
    assert_same_without_torch(artifact[0], _image(200, 64), tmp_path, QUESTION)


def test_ask_and_encoded_image_reuse(artifact):
    """The prefix through the image tokens (deepstack columns and all) is
    reused: each answer equals its own generate()."""
    s = _session(artifact[0])
    image = _image(128, 128)
    qs = [QUESTION, "how many shapes?"]
    want = [s.generate(image, q, max_new_tokens=6).token_ids for q in qs]
    answers = s.ask(image, qs, max_new_tokens=6)
    assert [a.token_ids for a in answers] == want and answers[0].timings["shared_tokens"] > 16
    enc = s.encode(image)
    assert [s.generate(enc, q, max_new_tokens=6).token_ids for q in qs] == want


def test_ort_flavour_is_refused_in_one_line(src, tmp_path):
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "vlm-export")
    r = subprocess.run([exe, "--model", str(src), "--decoder-flavour", "ort",
                        "--output", str(tmp_path / "o"), "--no-validate"],
                       capture_output=True, text=True, timeout=300)
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("vlm-export: error")]
    assert r.returncode != 0 and len(lines) == 1 and "mrope" in lines[0], r.stderr[-800:]
    assert not (tmp_path / "o").exists()


def test_feature_width_is_cross_checked(artifact, tmp_path):
    """A manifest whose image feature width disagrees with the decoder's
    (deepstack dropped, say) is refused when read, in one line."""
    from vlmedge.errors import ArtifactError

    m = manifest.read_json(artifact[0])
    m["decoder"]["deepstack_layers"] = 0
    with pytest.raises(ArtifactError, match="feature_dim") as e:
        manifest.Manifest.from_dict(m)
    assert "\n" not in str(e.value)


def test_int8_and_tensorrt_plan(src, tmp_path):
    from vlmedge.export import exporter

    art = tmp_path / "int8"
    summary = exporter.run_export(exporter.ExportOptions(
        model_dir=src, output=art, precision="int8", calib="synthetic", calib_size=6,
        accuracy_target=0.85, calib_cache="off"), log=lambda s: None)
    assert summary["quantization"]["passed"], summary["quantization"]
    r = _session(art).generate(_image(128, 128), QUESTION, max_new_tokens=4)
    assert r.timings["image_tokens"] == 16
    export_trt_fp16_and_check(src, tmp_path / "trt")
    # the fp16 graphs on onnxruntime's CPU provider: every float input fp16,
    # the vision graph's bilinear tap weights too (they were fed fp32)
    r = _session(tmp_path / "trt").generate(_image(128, 128), QUESTION, max_new_tokens=2)
    assert r.timings["image_tokens"] == 16 and r.timings["new_tokens"] >= 1


def test_unknown_architecture_still_refused_in_one_line(src):
    from transformers import AutoConfig

    from vlmedge.export.families import family_for

    cfg = AutoConfig.from_pretrained(src)
    cfg.architectures, cfg.model_type = ["Qwen3VLMoeForConditionalGeneration"], "qwen3_vl_moe"
    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture") as e:
        family_for(cfg)
    assert "\n" not in str(e.value)


def test_int4_fp16_export_gates_its_fp16_graphs(src, tmp_path):
    """--target trt --precision int4-fp16 on a family with float grid inputs and
    a deepstack decoder: the fp16 graphs run on onnxruntime's CPU provider for
    the second gate (the tiny model is untrained: no accuracy targets) and pass
    check-trt."""
    from vlmedge.export import exporter
    from vlmedge.export.trt import compat

    art = tmp_path / "w4"
    exporter.run_export(exporter.ExportOptions(
        model_dir=src, output=art, target="trt", precision="int4-fp16", calib="synthetic",
        calib_size=4, calib_cache="off", max_context=256, accuracy_target=0.0, min_cosine=0.0,
        max_accuracy_drop=100.0), log=lambda s: None)
    acc = manifest.read_json(art)["quantization"]["accuracy"]
    assert acc["fp16_graphs"]["measured"] is True and acc["final"]["positions"] > 0
    rep = compat.check_path(art)
    assert rep.passed, compat.format_report(rep)
