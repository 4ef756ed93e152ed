"""InternVL (InternVLForConditionalGeneration: InternViT + pixel shuffle +
MLP projector, Qwen2 decoder; GotOcr2 dynamic tiling): a tiny random-weight
model exports and validates; raw images of several sizes go through the
runtime's tiling to the processor's pixel_values (bit for bit) and prompt
ids, through the vision graph to PyTorch's image features, and through
generate() to transformers' greedy tokens. int8 and --target trt exports run."""
import json
import subprocess
import sys

import numpy as np
import pytest
from torch_blocker import PRELUDE

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from family_testing import export_trt_fp16_and_check, module_fixtures  # noqa: E402
from test_families import _hf_ids, _image, _text_config, _tokenizer  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import UnsupportedArchitectureError, UserInputError  # noqa: E402

QUESTION = "what color is the circle?"
# The -hf checkpoints' template (transformers' convert_internvl_weights_to_hf.py).
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
           "<video>", "<unk>"]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # InternVL's (ImageNet)
TILE, MAX_PATCHES = 32, 6  # 32 px tiles of 8 px patches: 16 patches, 4 tokens after the shuffle
TILING = {"method": "internvl", "tile_size": TILE, "min_patches": 1, "max_patches": MAX_PATCHES,
          "crop_to_patches": True, "use_thumbnail": True}


def build_internvl(out, seed: int = 10):
    """InternViT (2 layers, qkv bias, layer scale) over 32 px tiles, pixel
    shuffle 0.5 -> 4 tokens a tile, Qwen2 decoder with dynamic rope. Saved like the -hf
    checkpoints: tokenizer naming <img> </img> <IMG_CONTEXT>, GotOcr2 image
    processor (crop_to_patches false in its file: InternVLProcessor turns it
    on), processor_config.json and chat template. InternVLProcessor itself
    needs a video processor (torchvision): the family builds an image-only one."""
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil)

    tok, vocab = _tokenizer(SPECIAL, ["user", "assistant", "\n"] + scenes.vocabulary(boxes=False),
                            eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            extra_special_tokens={"start_image_token": "<img>",
                                                  "end_image_token": "</img>",
                                                  "context_image_token": "<IMG_CONTEXT>",
                                                  "video_token": "<video>"})
    torch.manual_seed(seed)  # 10: greedy answers that are not one repeated word
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=TILE, patch_size=8, attention_bias=True)
    # InternVL3's dynamic NTK rope (factor 2): the plain rope within max_position_embeddings
    text = dict(model_type="qwen2", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                     "rope_theta": 10000.0},
                **_text_config(vocab, bos_token_id=None, eos_token_id=vocab["<|im_end|>"],
                               pad_token_id=vocab["<|endoftext|>"]))
    cfg = InternVLConfig(vision_config=vision, text_config=text,
                         image_token_id=vocab["<IMG_CONTEXT>"], image_seq_length=4)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # positions and layer scales of a trained size, not ~0 / 0.1
        for name, p in model.model.vision_tower.named_parameters():
            if "position_embeddings" in name or "lambda_" in name or "cls_token" in name:
                p.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<|im_end|>"]],
                                               pad_token_id=vocab["<|endoftext|>"],
                                               do_sample=False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=False,
                             min_patches=1, max_patches=MAX_PATCHES, resample=3,
                             image_mean=MEAN, image_std=STD).save_pretrained(out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "InternVLProcessor", "image_seq_length": 4}))
    return out


# (w, h): wide (3 x 1 + thumbnail), square small (1 tile: area under half a
# 2 x 2 grid's), square large (2 x 2 + thumbnail: the tie goes to more tiles),
# tall (1 x 2 ... ), odd (2 x 1), very wide (6 x 1)
SIZES = [(100, 40), (40, 40), (80, 80), (50, 128), (64, 33), (300, 40)]


src, artifact, loaded = module_fixtures(build_internvl, "internvl")


def _session(art, **kw):
    from vlmedge.runtime import VLMSession
    return VLMSession(art, provider="cpu", threads=1, **kw)


# -- export -------------------------------------------------------------------------

def test_exports_and_validates(artifact):
    art, summary = artifact
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    assert v["max_abs_diff_logits"] <= 1e-4 and v["max_abs_diff_image_features"] <= 1e-4
    m = manifest.load(art)
    assert m.family == "internvl" and m.image.expand == "internvl"
    assert m.preprocess["tiling"] == TILING
    assert (m.preprocess["mean"], m.preprocess["std"]) == (MEAN, STD)
    assert m.image.tokens_per_image == m.image.image_seq_len == 4
    assert (m.image.image_start_token, m.image.image_end_token) == ("<img>", "</img>")
    for p in m.validation["prompts"]:  # greedy output of the random model is not one token
        assert len(set(p["torch_text"].split())) > 2, p["torch_text"]


def test_vision_graph_takes_tiles(artifact):
    import onnx

    vis = onnx.load(str(artifact[0] / "vision.onnx"), load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(vis.graph.input) + list(vis.graph.output)]
    assert dims == [["batch", 3, TILE, TILE], ["batch", 4, 32]]


# -- the tiling -----------------------------------------------------------------------

def test_grid_equals_transformers():
    """The runtime's grid choice = GotOcr2's get_optimal_tiled_canvas, over
    sizes, aspect ratios (exact ties included) and tile limits."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        get_optimal_tiled_canvas)

    from vlmedge.runtime.preprocess import internvl_grid

    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2))]
    sizes += [(480, 640), (448, 448), (100, 100), (20, 20), (448, 896), (1, 2000), (896, 448)]
    for lo, hi in [(1, 12), (1, 6), (2, 8), (1, 40), (3, 3), (5, 4)]:
        tiling = {**TILING, "tile_size": 448, "min_patches": lo, "max_patches": hi}
        for h, w in sizes:
            cols, rows = get_optimal_tiled_canvas((h, w), (448, 448), lo, hi)
            assert internvl_grid(h, w, tiling) == (rows, cols), (h, w, lo, hi)
    assert internvl_grid(480, 640, {**TILING, "crop_to_patches": False}) == (1, 1)


@pytest.mark.parametrize("size", SIZES)
def test_runtime_preprocessing_equals_processor(size, artifact, loaded):
    """Tiles bit for bit as the processor's pixel_values, the grid as its
    choice, the prompt ids (<img> + 4 per tile + </img>) as its input_ids."""
    s = _session(artifact[0])
    image = _image(*size)
    hf = _hf_ids(loaded.processor, image)
    pixels, grid = s.preprocess(image)
    ref = hf["pixel_values"].numpy()
    assert grid == loaded.family.image_grid(loaded.processor, image, hf)
    assert pixels.shape == ref.shape and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, ref)
    ids = hf["input_ids"][0].tolist()
    assert s.chat.prompt_ids(QUESTION, image_grid=grid) == ids
    rows, cols = grid
    assert ids.count(s.chat.image_token_id) == 4 * (rows * cols + (rows * cols > 1))


@pytest.mark.parametrize("size", [(100, 40), (40, 40)])
def test_image_features_equal_torch(size, artifact, loaded):
    s = _session(artifact[0])
    hf = dict(_hf_ids(loaded.processor, _image(*size)))
    with torch.inference_mode():
        ref = loaded.family.torch_image_features(loaded.model, hf).numpy()
    feats = s.encode_image(hf["pixel_values"].numpy())
    assert feats.shape == ref.shape == (hf["pixel_values"].shape[0], 4, 32)
    np.testing.assert_allclose(feats, ref, atol=1e-4)


@pytest.mark.parametrize("size", [(100, 40), (40, 40), (50, 128)])
def test_generate_on_raw_image_equals_torch(size, artifact, loaded):
    """generate() on a raw image = transformers' model.generate(do_sample=False)
    on the processor's inputs for it."""
    s = _session(artifact[0])
    image = _image(*size)
    hf = dict(loaded.family.hf_inputs(loaded.processor, image, QUESTION))
    with torch.inference_mode():
        out = loaded.model.generate(**hf, max_new_tokens=8, do_sample=False)
    ref = out[0, hf["input_ids"].shape[1]:].tolist()
    stops = [i for i, t in enumerate(ref) if t in s.chat.stop_token_ids]
    want = ref[:stops[0]] if stops else ref  # generate() leaves the stop token out
    r = s.generate(image, QUESTION, max_new_tokens=8)
    assert r.token_ids == want, (r.token_ids, ref)
    assert r.timings["image_tokens"] == hf["input_ids"].eq(s.chat.image_token_id).sum().item()


def test_raw_image_generation_without_torch(artifact, tmp_path):
    path = tmp_path / "wide.png"
    _image(100, 40).save(path)
    want = _session(artifact[0]).generate(str(path), QUESTION, max_new_tokens=6).token_ids
    code = f"""
{PRELUDE}import json
from vlmedge.runtime import VLMSession
s = VLMSession({str(artifact[0])!r}, provider='cpu', threads=1)
r = s.generate({str(path)!r}, {QUESTION!r}, max_new_tokens=6)
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print(json.dumps(r.token_ids))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == want


# -- budgets, bad input, TensorRT plan, refusals ---------------------------------------

def test_image_token_budget_lowers_max_patches(artifact, loaded):
    """A budget lowers max_patches to the largest whose tiling fits (what the
    processor makes with that max_patches); under one tile it is refused."""
    from vlmedge.runtime.image_budget import budget_tiling

    s = _session(artifact[0])
    image = _image(300, 40)  # 6 x 1 + thumbnail: 28 tokens
    assert s.generate(image, QUESTION, max_new_tokens=2).timings["image_tokens"] == 28
    small = s.generate(image, QUESTION, max_new_tokens=2, max_image_tokens=17)
    assert small.timings["image_tokens"] == 16  # max_patches 3: 3 x 1 + thumbnail
    tiling = budget_tiling(s.preprocessor.config["tiling"], s.image_facts, (40, 300), 17)
    assert tiling["max_patches"] == 3
    pixels, grid = s.preprocessor.preprocess(np.asarray(image), tiling=tiling)
    ref = _hf_ids(loaded.processor, image, max_patches=3)
    np.testing.assert_array_equal(pixels, ref["pixel_values"].numpy())
    assert s.chat.prompt_ids(QUESTION, image_grid=grid) == ref["input_ids"][0].tolist()
    assert s.generate(image, QUESTION, max_new_tokens=2,
                      max_image_tokens=5).timings["image_tokens"] == 4  # one tile
    with pytest.raises(UserInputError) as e:
        s.generate(image, QUESTION, max_new_tokens=2, max_image_tokens=3)
    assert "\n" not in str(e.value) and "at least one tile" in str(e.value)


def test_bad_grids_are_refused(artifact):
    s = _session(artifact[0])
    for bad in (None, (0, 2), (2,), "2x2"):
        with pytest.raises(UserInputError, match="grid"):
            s.chat.prompt_ids(QUESTION, image_grid=bad)


def test_tensorrt_plan_ranges_tiles(artifact):
    from vlmedge.export.trt import profiles

    m = manifest.read_json(artifact[0])
    plan = profiles.make_plan(m, profiles.Limits(512))
    # 1 tile .. 6 x 1 + thumbnail; opt: a 640 x 480 frame is 3 x 2 (+1) under max_patches 6
    assert plan["components"]["vision"]["profiles"][0]["dims"]["batch"] == [1, 7, 7]


@pytest.mark.parametrize("change,match", [
    ({"vision_feature_select_strategy": "full"}, "class token"),
    ({"vision_feature_layer": [-1, -2]}, "vision_feature_layer"),
    ({"downsample_ratio": 0.3}, "downsample_ratio"),
])
def test_unsupported_configs_are_refused_in_one_line(change, match, src):
    from transformers import AutoConfig

    from vlmedge.export.families import family_for

    cfg = AutoConfig.from_pretrained(src)
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(UnsupportedArchitectureError, match=match) as e:
        family_for(cfg).check_config(cfg)
    assert "\n" not in str(e.value)


def test_unsupported_text_model_is_refused(src):
    from transformers import AutoConfig

    from vlmedge.export.families import family_for

    cfg = AutoConfig.from_pretrained(src)
    cfg.text_config.model_type = "gpt_oss"
    with pytest.raises(UnsupportedArchitectureError, match="language model") as e:
        family_for(cfg).check_config(cfg)
    assert "\n" not in str(e.value)


# -- int8 and TensorRT ------------------------------------------------------------------

def test_int8_export_runs(src, tmp_path):
    """Static QDQ int8 (synthetic calibration) over the tile batch: the
    artifact loads and answers; the gate's figures are in the summary."""
    from vlmedge.export import exporter

    art = tmp_path / "tiny-internvl-int8"
    summary = exporter.run_export(exporter.ExportOptions(
        model_dir=src, output=art, precision="int8", calib="synthetic", calib_size=6,
        accuracy_target=0.85, calib_cache="off"), log=lambda s: None)
    q = summary["quantization"]
    assert q["passed"], q
    assert manifest.load(art).precision == "int8"
    r = _session(art).generate(_image(100, 40), QUESTION, max_new_tokens=4)
    assert r.timings["image_tokens"] == 16


def test_check_trt_on_fp16_trt_export(src, tmp_path):
    from pathlib import Path

    art = tmp_path / "tiny-internvl-trt-fp16"
    export_trt_fp16_and_check(src, art)  # exported through the CLI, check-trt's report passes
    exe = str(Path(sys.executable).parent / "vlm-export")
    r = subprocess.run([exe, "check-trt", str(art)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
