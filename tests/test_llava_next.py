"""LLaVA-NeXT and LLaVA-OneVision ("anyres" tiling, unpadding, OneVision's
anyres_max_K shrinking): tiny random-weight models export and validate; raw
images of several sizes go through the runtime's tiling to the processor's
pixel_values and prompt ids, through the vision graph and the host-side
packing (runtime/anyres.py) to PyTorch's image features, and through
generate() to PyTorch's greedy tokens."""
import json
import subprocess
import sys

import numpy as np
import pytest
from torch_blocker import PRELUDE

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from test_families import _hf_ids, _image, _text_config, _tokenizer  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import ArtifactError, UnsupportedArchitectureError, UserInputError  # noqa: E402

QUESTION = "what color is the circle?"
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# 32 px tiles of 8 px patches: 4 x 4 features a tile. Up to 3 x 3 tiles, so a
# 3 x 3 map (12 x 12 features) is shrunk under OneVision's anyres_max_4.
PINS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [96, 96]]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>"]


def _tiny_tokenizer():
    return _tokenizer(SPECIAL, ["user", "assistant", "\n"] + scenes.vocabulary(boxes=False),
                      eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _finish(model, vocab, out):
    """A newline vector as large as a feature (the init's is ~0.2 of one) and
    greedy generation that stops at <|im_end|>."""
    from transformers import GenerationConfig

    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 1.0)
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<|im_end|>"]],
                                               pad_token_id=vocab["<|endoftext|>"],
                                               do_sample=False)
    model.save_pretrained(out)
    return out


def build_onevision(out):
    """SigLIP 32 px tiles, Qwen2 decoder, vision_aspect_ratio anyres_max_4.
    Saved like the hub's: tokenizer, image processor, processor_config.json
    and chat template (LlavaOnevisionProcessor itself needs a video processor,
    which needs torchvision: the family builds an image-only one)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tok, vocab = _tiny_tokenizer()
    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
                  vision_use_head=False)
    text = dict(model_type="qwen2", **_text_config(vocab, bos_token_id=None,
                                                   eos_token_id=vocab["<|im_end|>"],
                                                   pad_token_id=vocab["<|endoftext|>"]))
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_index=vocab["<image>"],
                               video_token_index=vocab["<video>"], image_grid_pinpoints=PINS,
                               vision_aspect_ratio="anyres_max_4", vision_feature_layer=-1,
                               vision_feature_select_strategy="full")
    _finish(LlavaOnevisionForConditionalGeneration(cfg).eval(), vocab, out)
    tok.save_pretrained(out)
    LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                    image_grid_pinpoints=PINS).save_pretrained(out)
    (out / "chat_template.jinja").write_text(TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_4",
        "image_token": "<image>", "video_token": "<video>"}))
    return out


def build_llava_next(out):
    """CLIP 32 px tiles (class token dropped, the second-to-last layer), Llama
    decoder; LlavaNextProcessor as llava-v1.6's (patch_size, 'default'
    strategy, one additional image token for CLIP's class token)."""
    from transformers import (LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil)

    tok, vocab = _tiny_tokenizer()
    torch.manual_seed(6)  # a seed whose greedy answers are not one repeated word
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                  projection_dim=32)
    text = LlamaConfig(**_text_config(vocab, bos_token_id=None, eos_token_id=vocab["<|im_end|>"],
                                      pad_token_id=vocab["<|endoftext|>"]))
    cfg = LlavaNextConfig(vision_config=vision, text_config=text,
                          image_token_index=vocab["<image>"], image_grid_pinpoints=PINS,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
    _finish(LlavaNextForConditionalGeneration(cfg).eval(), vocab, out)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32},
                                    crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=PINS)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                       vision_feature_select_strategy="default", chat_template=TEMPLATE,
                       num_additional_image_tokens=1).save_pretrained(out)
    return out


BUILDERS = {"llava_onevision": build_onevision, "llava_next": build_llava_next}
FAMILIES = sorted(BUILDERS)
# (w, h): wide (1 x 3 tiles, rows unpadded), tall (3 x 3, columns unpadded),
# small (1 x 1, upscaled), large (3 x 3, rows unpadded; OneVision shrinks it)
SIZES = [(300, 90), (50, 128), (20, 20), (200, 180)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(f"tiny_{name}"))
            for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def artifacts(dirs, tmp_path_factory):
    from vlmedge.export import exporter

    arts = tmp_path_factory.mktemp("anyres_arts")
    out = {}
    for name, src in dirs.items():
        art = arts / f"tiny-{name}"
        out[name] = (art, exporter.run_export(exporter.ExportOptions(model_dir=src, output=art),
                                              log=lambda s: None))
    return out


@pytest.fixture(scope="module")
def loaded(dirs):
    from vlmedge.export import loading
    return {name: loading.load(d) for name, d in dirs.items()}


def _session(art, **kw):
    from vlmedge.runtime import VLMSession
    return VLMSession(art, provider="cpu", threads=1, **kw)


# -- export -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_exports_and_validates(family, artifacts):
    art, summary = artifacts[family]
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    assert v["max_abs_diff_logits"] <= 1e-4 and v["max_abs_diff_image_features"] <= 1e-4
    m = manifest.load(art)
    assert m.family == family and m.image.expand == "anyres"
    assert m.preprocess["tiling"] == {"method": "anyres", "tile_size": 32, "grid_pinpoints": PINS}
    assert m.image.tokens_per_image == 16 and len(m.image.image_newline) == 32
    assert m.image.anyres_max_tiles == (4 if family == "llava_onevision" else None)
    for p in m.validation["prompts"]:  # greedy output of the random model is not one token
        assert len(set(p["torch_text"].split())) > 2, p["torch_text"]


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_graph_takes_tiles(family, artifacts):
    import onnx

    vis = onnx.load(str(artifacts[family][0] / "vision.onnx"), load_external_data=False)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(vis.graph.input) + list(vis.graph.output)]
    assert dims == [["batch", 3, 32, 32], ["batch", 16, 32]]


# -- raw images through the runtime ---------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_runtime_preprocessing_equals_processor(family, size, artifacts, loaded):
    """Tiles bit for bit as the processor's pixel_values, the grid as its
    image_sizes + best pinpoint, the prompt ids (the image token count) as its."""
    lm = loaded[family]
    s = _session(artifacts[family][0])
    image = _image(*size)
    hf = _hf_ids(lm.processor, image)
    pixels, grid = s.preprocess(image)
    ref = hf["pixel_values"][0].numpy()
    assert grid == lm.family.image_grid(lm.processor, image, hf)
    assert grid[:2] == (size[1], size[0])
    assert pixels.shape == ref.shape and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, ref)
    assert s.chat.prompt_ids(QUESTION, image_grid=grid) == hf["input_ids"][0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", SIZES)
def test_packed_features_equal_torch(family, size, artifacts, loaded):
    """Vision graph + host packing = get_image_features' packed output;
    OneVision's large image goes through the bilinear shrinking (its 10 x 12
    unpadded map is more than 1.1^2 x 4 tiles' worth: 7 x 8)."""
    from vlmedge.runtime import anyres

    lm = loaded[family]
    s = _session(artifacts[family][0])
    hf = dict(_hf_ids(lm.processor, _image(*size)))
    grid = lm.family.image_grid(lm.processor, None, hf)
    with torch.inference_mode():
        ref = lm.family.torch_image_features(lm.model, hf).numpy()
    feats = s.encode_image(hf["pixel_values"][0].numpy(), image_grid=grid)
    assert feats.shape == ref.shape == (1, anyres.image_token_count(grid, s.image_facts), 32)
    np.testing.assert_allclose(feats, ref, atol=1e-4)
    shrunk = anyres.feature_layout(grid, s.image_facts)["shrunk"]
    assert (shrunk is not None) == (family == "llava_onevision" and size == (200, 180))


def test_bilinear_equals_torch():
    from vlmedge.runtime import anyres

    x = np.random.default_rng(0).standard_normal((12, 7, 5)).astype(np.float32)
    for out in [(8, 4), (5, 7), (12, 3), (3, 9)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], out,
                                              mode="bilinear")[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(anyres.bilinear(x, *out), ref, atol=1e-6)


GENERATE_CASES = [("llava_onevision", (300, 90)), ("llava_onevision", (50, 128)),
                  ("llava_onevision", (20, 20)), ("llava_next", (300, 90)),
                  ("llava_next", (200, 180)), ("llava_next", (20, 20))]


@pytest.mark.parametrize("family,size", GENERATE_CASES)
def test_generate_on_raw_image_equals_torch(family, size, artifacts, loaded):
    """generate() on a raw image = transformers' model.generate(do_sample=False)
    on the processor's inputs for it."""
    lm = loaded[family]
    s = _session(artifacts[family][0])
    image = _image(*size)
    hf = dict(lm.family.hf_inputs(lm.processor, image, QUESTION))
    with torch.inference_mode():
        out = lm.model.generate(**hf, max_new_tokens=8, do_sample=False)
    ref = out[0, hf["input_ids"].shape[1]:].tolist()
    stops = [i for i, t in enumerate(ref) if t in s.chat.stop_token_ids]
    want = ref[:stops[0]] if stops else ref  # generate() leaves the stop token out
    r = s.generate(image, QUESTION, max_new_tokens=8)
    assert r.token_ids == want, (r.token_ids, ref)
    assert r.timings["image_tokens"] == hf["input_ids"].eq(s.chat.image_token_id).sum().item()


def test_raw_image_generation_without_torch(artifacts, tmp_path):
    art = artifacts["llava_onevision"][0]
    path = tmp_path / "tall.png"
    _image(50, 128).save(path)
    want = _session(art).generate(str(path), QUESTION, max_new_tokens=6).token_ids
    code = f"""
{PRELUDE}import json
from vlmedge.runtime import VLMSession
s = VLMSession({str(art)!r}, provider='cpu', threads=1)
r = s.generate({str(path)!r}, {QUESTION!r}, max_new_tokens=6)
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print(json.dumps(r.token_ids))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == want


def test_stream_and_ask(artifacts):
    s = _session(artifacts["llava_next"][0])
    image = scenes.make_scene(7).image
    qs = [QUESTION, "describe the image."]
    want = [s.generate(image, q, max_new_tokens=6) for q in qs]
    assert "".join(s.stream(image, qs[0], max_new_tokens=6)) == want[0].text
    assert [a.token_ids for a in s.ask(image, qs, max_new_tokens=6)] == \
        [w.token_ids for w in want]


# -- budgets, bad input, manifests, TensorRT plan ------------------------------------

def test_image_token_budget_narrows_pinpoints(artifacts):
    """A budget keeps the pinpoints whose packed image fits; below the
    smallest it is refused in one line; the budgeted grid packs consistently."""
    s = _session(artifacts["llava_onevision"][0])
    image = _image(200, 180)
    full = s.generate(image, QUESTION, max_new_tokens=2)
    assert full.timings["image_tokens"] == 16 + 7 * 9  # 3 x 3 tiles, unpadded, shrunk to 7 x 8
    small = s.generate(image, QUESTION, max_new_tokens=2, max_image_tokens=60)
    assert small.timings["image_tokens"] <= 60
    with pytest.raises(UserInputError) as e:
        s.generate(image, QUESTION, max_new_tokens=2, max_image_tokens=20)
    assert "\n" not in str(e.value) and "at least" in str(e.value)


def test_bad_grids_are_refused(artifacts):
    s = _session(artifacts["llava_next"][0])
    for bad in (None, (90, 300), (90, 300, 33, 96), (0, 300, 32, 96), "90x300"):
        with pytest.raises(UserInputError, match="grid|size"):
            s.chat.prompt_ids(QUESTION, image_grid=bad)
    with pytest.raises(UserInputError, match="disagree"):
        s.encode_image(np.zeros((2, 3, 32, 32), np.float32), image_grid=(90, 300, 32, 96))


def test_manifest_newline_must_match_feature_dim(artifacts):
    d = manifest.read_json(artifacts["llava_onevision"][0])
    d["image"]["image_newline"] = d["image"]["image_newline"][:-1]
    with pytest.raises(ArtifactError, match="image_newline"):
        manifest.Manifest.from_dict(d)
    d["image"]["image_newline"] = None
    with pytest.raises(ArtifactError, match="image_newline"):
        manifest.Manifest.from_dict(d)


def test_tensorrt_plan_ranges_tiles(artifacts):
    from vlmedge.export.trt import profiles

    m = manifest.read_json(artifacts["llava_onevision"][0])
    plan = profiles.make_plan(m, profiles.Limits(512))
    # from 1: the runtime feeds the tiles one at a time
    assert plan["components"]["vision"]["profiles"][0]["dims"]["batch"] == [1, 5, 10]


@pytest.mark.parametrize("change,match", [
    ({"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio"),
    ({"image_grid_pinpoints": [[32, 40]]}, "pinpoints"),
])
def test_unsupported_configs_are_refused_in_one_line(change, match, dirs):
    from transformers import AutoConfig

    from vlmedge.export.families import family_for

    cfg = AutoConfig.from_pretrained(dirs["llava_onevision"])
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(UnsupportedArchitectureError, match=match) as e:
        family_for(cfg).check_config(cfg)
    assert "\n" not in str(e.value)
