"""Idefics3 (SmolVLM), Qwen2-VL and Qwen2.5-VL families: tiny random-weight
models export and validate; names and dims are as DESIGN.md says; the
runtime's prompt ids, mrope positions and vision inputs equal what
transformers computes; raw images go through the runtime's own tiling and
patching to the same pixels, ids and greedy tokens as the HF processor + model."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from torch_blocker import PRELUDE

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
PIL = pytest.importorskip("PIL.Image")

from vlmedge import manifest  # noqa: E402
from vlmedge.demo import scenes  # noqa: E402
from vlmedge.errors import UserInputError  # noqa: E402

QUESTION = "what color is the circle?"


# -- tiny models ---------------------------------------------------------------

def _tokenizer(special: list[str], words: list[str], **kw):
    """A word-level fast tokenizer that keeps "\\n" as a token (the Idefics3
    expansion and the Qwen template put newlines between tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), behavior="removed",
                                             invert=True)
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(special)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kw), vocab


def _text_config(vocab: dict, **kw) -> dict:
    # initializer_range 0.2: random logits far from flat, so greedy output is not a cycle.
    return dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                initializer_range=0.2, **kw)


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def build_idefics3(out: Path) -> Path:
    """SigLIP 64x64 tiles of 16x16 patches, scale 2 -> 4 tokens per tile; images
    resized to a 128 long side and split into up to 2x2 tiles + a global one."""
    from transformers import (GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessor, Idefics3Processor, LlamaConfig)
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    rowcol = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    special = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>",
               "<fake_token_around_image>", "<image>", "<global-img>"] + rowcol
    tok, vocab = _tokenizer(special, ["User", "Assistant", ":", "\n"] + scenes.vocabulary(boxes=False),
                            bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                            pad_token="<pad>")
    torch.manual_seed(0)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=64, patch_size=16)
    text = LlamaConfig(**_text_config(vocab, bos_token_id=vocab["<|im_start|>"],
                                      eos_token_id=vocab["<end_of_utterance>"],
                                      pad_token_id=vocab["<pad>"]))
    cfg = Idefics3Config(vision_config=vision, text_config=text, image_token_id=vocab["<image>"],
                         scale_factor=2, pad_token_id=vocab["<pad>"])
    model = Idefics3ForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<end_of_utterance>"]],
                                               pad_token_id=vocab["<pad>"], do_sample=False)
    ip = Idefics3ImageProcessor(size={"longest_edge": 128}, max_image_size={"longest_edge": 64},
                                do_image_splitting=True, resample=1)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                             chat_template=IDEFICS3_TEMPLATE)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_qwen2_vl(out: Path, v2_5: bool = False) -> Path:
    """8x8 patches, 2x2 merge; images resized to at most 64x64 pixels (an
    8x8 patch grid, 16 image tokens). mrope sections (2, 1, 1) of head_dim 8.
    Qwen2.5-VL: 2 vision blocks, the first with 32-pixel windows (2x2 merged
    patches; 4 windows for the sample image), the second full attention.

    Saves tokenizer, image processor and chat template; not a processor
    config: Qwen2VLProcessor needs a video processor, which needs
    torchvision (the qwen2_vl family builds an image-only one)."""
    from transformers import (GenerationConfig, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<unk>"]
    tok, vocab = _tokenizer(special, ["user", "assistant", "\n"] + scenes.vocabulary(boxes=False),
                            eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            extra_special_tokens={"image_token": "<|image_pad|>",
                                                  "video_token": "<|video_pad|>"})
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
    vision = dict(num_heads=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    if v2_5:
        vision.update(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64,
                      window_size=32, fullatt_block_indexes=[1])
    else:
        vision.update(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2)
    config_class, model_class = (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration) if v2_5 \
        else (Qwen2VLConfig, Qwen2VLForConditionalGeneration)
    cfg = config_class(
        vision_config=vision,
        text_config=_text_config(vocab, rope_parameters=rope, bos_token_id=None,
                                 eos_token_id=vocab["<|im_end|>"],
                                 pad_token_id=vocab["<|endoftext|>"]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"])
    model = model_class(cfg).eval()
    model.generation_config = GenerationConfig(eos_token_id=[vocab["<|im_end|>"]],
                                               pad_token_id=vocab["<|endoftext|>"],
                                               do_sample=False)
    ip = Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                  min_pixels=16 * 16, max_pixels=64 * 64)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    ip.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN_TEMPLATE)
    return out


BUILDERS = {"idefics3": build_idefics3, "qwen2_vl": build_qwen2_vl,
            "qwen2_5_vl": lambda out: build_qwen2_vl(out, v2_5=True)}
QWENS = ["qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    return {name: build(tmp_path_factory.mktemp(f"tiny_{name}"))
            for name, build in BUILDERS.items()}


@pytest.fixture(scope="session")
def family_artifacts(family_dirs, tmp_path_factory):
    """{family: (artifact dir, export summary)}, each exported once."""
    from vlmedge.export import exporter

    arts = tmp_path_factory.mktemp("family_arts")
    out = {}
    for name, src in family_dirs.items():
        art = arts / f"tiny-{name}-onnx-fp32"
        summary = exporter.run_export(exporter.ExportOptions(model_dir=src, output=art),
                                      log=lambda s: None)
        out[name] = (art, summary)
    return out


@pytest.fixture(scope="session")
def loaded(family_dirs):
    """{family: LoadedModel}: the PyTorch side, loaded as the exporter loads it."""
    from vlmedge.export import loading
    return {name: loading.load(d) for name, d in family_dirs.items()}


def _session(art):
    from vlmedge.runtime import VLMSession
    return VLMSession(art, provider="cpu", threads=1)


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


# -- export + validation -----------------------------------------------------------

@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_tiny_family_exports_and_validates(family, family_artifacts):
    art, summary = family_artifacts[family]
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    assert v["max_abs_diff_logits"] <= 1e-4 and v["max_abs_diff_image_features"] <= 1e-4
    assert v["cached_vs_recompute_max_abs_diff"] <= 1e-4
    m = manifest.load(art)
    assert m.family == family and set(summary["files"]) == set(m.files)
    assert m.decoder.position_ids == ("1d" if family == "idefics3" else "mrope")
    # Greedy output of the random model is not one token repeated.
    for p in m.validation["prompts"]:
        assert len(set(p["torch_text"].split())) > 2, p["torch_text"]


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_names_and_dynamic_dims(family, family_artifacts):
    art, _ = family_artifacts[family]
    dec = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    ins = {v.name: _dims(v) for v in dec.graph.input}
    outs = {v.name: _dims(v) for v in dec.graph.output}
    assert list(ins)[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert ins["inputs_embeds"][:2] == ["batch", "sequence_length"]
    assert ins["attention_mask"] == ["batch", "total_sequence_length"]
    want_pos = ["batch", "sequence_length"] if family == "idefics3" else \
        [3, "batch", "sequence_length"]
    assert ins["position_ids"] == want_pos
    assert ins["past_key_values.0.key"] == ["batch", 2, "past_sequence_length", 8]
    assert outs["present.0.value"] == ["batch", 2, "total_sequence_length", 8]
    assert outs["logits"][:2] == ["batch", 1]
    emb = onnx.load(str(art / "embed.onnx"), load_external_data=False)
    assert [_dims(v) for v in emb.graph.input] == [["batch", "sequence_length"]]
    vis = onnx.load(str(art / "vision.onnx"), load_external_data=False)
    vin = {v.name: _dims(v) for v in vis.graph.input}
    vout = {v.name: _dims(v) for v in vis.graph.output}
    if family == "idefics3":  # real tiles in, tokens per tile out
        assert vin == {"pixel_values": ["batch", 3, 64, 64]}
        assert vout == {"image_features": ["batch", 4, 32]}
    else:  # one image's flattened patches + host-computed grid inputs
        want = {"pixel_values": ["num_patches", 3 * 2 * 8 * 8],
                "vision_position_ids": ["num_patches", 2]}  # cu_seqlens: from the shape
        if family == "qwen2_5_vl":  # window bounds: any count of attention windows
            want.update(window_index=["num_image_tokens"], cu_window_seqlens=["num_window_edges"])
        assert vin == want
        assert vout == {"image_features": [1, "num_image_tokens", 32]}


def test_idefics3_vision_graph_has_no_attention_mask(family_artifacts):
    """Every tile is whole, so the tower's all-true patch mask is left out of the
    attention: no additive mask and no NaN guard over the probabilities (IsNaN +
    Where per layer, 28% of the SmolVLM-256M vision graph's onnxruntime time),
    just MatMul, Softmax, MatMul; the validation above holds it to PyTorch."""
    vis = onnx.load(str(family_artifacts["idefics3"][0] / "vision.onnx"),
                    load_external_data=False)
    ops = [n.op_type for n in vis.graph.node]
    assert "IsNaN" not in ops and ops.count("Softmax") >= 1
    softmax_inputs = {n.input[0] for n in vis.graph.node if n.op_type == "Softmax"}
    producers = {o: n.op_type for n in vis.graph.node for o in n.output}
    assert {producers[i] for i in softmax_inputs} <= {"MatMul", "Mul", "Div"}  # no mask Add


# -- Idefics3: prompt expansion ----------------------------------------------------

def _image(w, h, seed=3):
    rng = np.random.default_rng(seed)
    return PIL.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_ids(proc, image, question=QUESTION, **kw):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    return proc(images=image, text=text, return_tensors="pt", **kw)


@pytest.mark.parametrize("size", [(128, 128), (128, 60), (50, 128), (300, 90), (40, 40)])
def test_idefics3_prompt_ids_equal_processor(size, family_artifacts, loaded):
    """Square, wide, tall, very wide and small (upscaled) images: the
    runtime's expansion from the tile grid equals the processor's ids."""
    proc = loaded["idefics3"].processor
    chat = _session(family_artifacts["idefics3"][0]).chat
    image = _image(*size)
    info = proc.image_processor(images=image, return_row_col_info=True)
    grid = (info["rows"][0][0], info["cols"][0][0])
    ref = _hf_ids(proc, image)["input_ids"][0].tolist()
    assert chat.prompt_ids(QUESTION, image_grid=grid) == ref
    assert ref.count(chat.image_token_id) == 4 * (grid[0] * grid[1] + 1)


def test_idefics3_unsplit_image_and_bad_grids(family_artifacts, loaded):
    proc = loaded["idefics3"].processor
    chat = _session(family_artifacts["idefics3"][0]).chat
    ref = _hf_ids(proc, _image(128, 128), do_image_splitting=False)["input_ids"][0].tolist()
    assert chat.prompt_ids(QUESTION, image_grid=(0, 0)) == ref
    for bad in (None, (1, 0), (-1, 2), "2x2"):
        with pytest.raises(UserInputError, match="grid"):
            chat.prompt_ids(QUESTION, image_grid=bad)
    # Text-only prompts need no grid.
    assert chat.image_token_id not in chat.prompt_ids(QUESTION, with_image=False)


def test_idefics3_tiles_of_another_image(family_artifacts, loaded):
    """A 1x2 tile grid (3 tiles) through the runtime equals PyTorch end to end."""
    lm = loaded["idefics3"]
    s = _session(family_artifacts["idefics3"][0])
    image = _image(300, 90)
    hf = dict(_hf_ids(lm.processor, image))
    grid = lm.family.image_grid(lm.processor, image, hf)
    assert grid == (1, 2)
    with torch.inference_mode():
        ref = lm.family.torch_image_features(lm.model, hf).numpy()
        ref_logits = lm.model(**hf).logits[0, -1].numpy()
    feats = s.encode_image(lm.family.vision_args(hf)[0].numpy())
    assert feats.shape == (3, 4, 32)
    np.testing.assert_allclose(feats, ref, atol=1e-4)
    logits, _ = s.prefill(s.chat.prompt_ids(QUESTION, image_grid=grid), feats, s.empty_cache())
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)


# -- Qwen2-VL: host-side positions -----------------------------------------------------

@pytest.mark.parametrize("family", QWENS)
@pytest.mark.parametrize("size", [(128, 128), (200, 64), (40, 120), (20, 20)])
def test_qwen_host_positions_equal_transformers(family, size, loaded, family_artifacts):
    """Prompt ids, mrope position ids (and rope delta), vision position ids,
    cu_seqlens and attention windows from runtime/mrope.py equal
    transformers' for several grids."""
    from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_position_ids,
                                           get_vision_window_index)

    from vlmedge.runtime import mrope

    lm = loaded[family]
    chat = _session(family_artifacts[family][0]).chat
    hf = _hf_ids(lm.processor, _image(*size))
    grid = tuple(hf["image_grid_thw"][0].tolist())
    ids = hf["input_ids"][0].tolist()
    assert chat.prompt_ids(QUESTION, image_grid=grid) == ids
    ref_pos, ref_delta = lm.model.model.get_rope_index(
        hf["input_ids"], hf["mm_token_type_ids"], image_grid_thw=hf["image_grid_thw"])
    pos = mrope.rope_index(ids, lm.model.config.image_token_id, [grid], 2)
    np.testing.assert_array_equal(pos, ref_pos[:, 0].numpy())
    positions, offset = mrope.MropePositions(lm.model.config.image_token_id, 2)(
        0, 0, len(ids), ids, grid)
    assert positions.shape == (3, 1, len(ids)) and offset == int(ref_delta)
    g = torch.tensor([grid])
    np.testing.assert_array_equal(mrope.vision_position_ids(grid, 2),
                                  get_vision_position_ids(g, 2).numpy())
    np.testing.assert_array_equal(mrope.vision_cu_seqlens(grid, 2),
                                  get_vision_cu_seqlens(g).numpy())
    index, cu = mrope.vision_window_index(grid, 2, 32, 8)
    ref_index, ref_cu = get_vision_window_index(g, 2, 32, 8)
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


@pytest.mark.parametrize("family", QWENS)
def test_qwen_one_graph_serves_other_grids(family, family_artifacts, loaded):
    """The vision graph traced on one grid runs a 4x14 one (wide image) as
    PyTorch does."""
    lm = loaded[family]
    s = _session(family_artifacts[family][0])
    hf = dict(_hf_ids(lm.processor, _image(200, 64)))
    grid = tuple(hf["image_grid_thw"][0].tolist())
    assert grid[1] != grid[2] and grid != (1, 8, 8)
    with torch.inference_mode():
        ref = lm.family.torch_image_features(lm.model, hf).numpy()
        ref_logits = lm.model(**hf).logits[0, -1].numpy()
    feats = s.encode_image(hf["pixel_values"].numpy(), image_grid=grid)
    np.testing.assert_allclose(feats, ref, atol=1e-4)
    ids = hf["input_ids"][0].tolist()
    logits, cache = s.prefill(ids, feats, s.empty_cache(), image_grid=grid)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    assert cache.position_offset < 0  # the image took fewer positions than tokens
    with pytest.raises(UserInputError, match="grid"):
        s.encode_image(hf["pixel_values"].numpy())
    with pytest.raises(UserInputError, match="grid"):
        s.prefill(ids, feats, s.empty_cache())
    with pytest.raises(UserInputError, match="grid"):
        s.chat.prompt_ids(QUESTION, image_grid=(1, 3, 4))  # 3 is not a multiple of merge 2


# (w, h) -> patch grid, attention windows (32 px = 2x2 merged patches each):
# square, wide, tall, tiny, very thin; the validation image's grid has 4 windows.
WINDOW_SIZES = [(128, 128), (200, 64), (64, 48), (20, 20), (50, 128), (100, 40), (30, 200),
                (60, 100), (240, 30), (16, 300), (32, 64)]


def test_qwen2_5_vl_one_graph_serves_every_window_count(family_artifacts, loaded):
    """Images of 11 sizes (1 to 9 attention windows; 3 of them with the
    validation image's 4) through the one vision graph: image_features as
    PyTorch's get_image_features."""
    from vlmedge.runtime import mrope

    lm = loaded["qwen2_5_vl"]
    s = _session(family_artifacts["qwen2_5_vl"][0])
    counts = set()
    for size in WINDOW_SIZES:
        hf = dict(_hf_ids(lm.processor, _image(*size)))
        grid = tuple(hf["image_grid_thw"][0].tolist())
        counts.add(len(mrope.vision_window_index(grid, 2, 32, 8)[1]) - 1)
        with torch.inference_mode():
            ref = lm.family.torch_image_features(lm.model, hf).numpy()
        feats = s.encode_image(hf["pixel_values"].numpy(), image_grid=grid)
        np.testing.assert_allclose(feats, ref, atol=1e-4, err_msg=f"{size} -> grid {grid}")
    assert counts == {1, 2, 3, 4, 5, 6, 9}


def test_qwen2_5_vl_fixed_window_count_is_refused_in_one_line(family_artifacts):
    """An artifact exported before the window count was a dim (manifest
    image.window_count, cu_window_seqlens of fixed length) still parses and
    refuses a grid of another window count in one line saying what to do."""
    from vlmedge.runtime import mrope

    d = manifest.read_json(family_artifacts["qwen2_5_vl"][0])
    assert "window_count" not in d["image"]  # new artifacts: every grid
    d["image"]["window_count"] = 4
    image = manifest.Manifest.from_dict(d).image
    assert image.window_count == 4
    shapes = {"vision_position_ids": ["num_patches", 2], "window_index": ["num_image_tokens"],
              "cu_window_seqlens": [5]}  # the old graph: 4 windows + 1
    names = ["vision_position_ids", "window_index", "cu_window_seqlens"]
    assert len(mrope.vision_inputs(names, (1, 8, 8), image, shapes)["cu_window_seqlens"]) == 5
    with pytest.raises(UserInputError) as e:
        mrope.vision_inputs(names, (1, 2, 2), image, shapes)
    msg = str(e.value)
    assert "\n" not in msg and "window count 4" in msg and "window count 1" in msg
    assert "re-export" in msg


@pytest.mark.parametrize("family", QWENS)
def test_qwen_runtime_without_torch(family, family_artifacts, loaded):
    """Host-side mrope and vision inputs need neither torch nor transformers."""
    lm = loaded[family]
    hf = _hf_ids(lm.processor, scenes.make_scene(5).image)
    tmp = Path(family_artifacts[family][0]).parent / f"{family}_pixels.npy"
    np.save(tmp, hf["pixel_values"].numpy())
    grid = tuple(hf["image_grid_thw"][0].tolist())
    code = f"""
{PRELUDE}import numpy as np
from vlmedge.runtime import VLMSession
s = VLMSession({str(family_artifacts[family][0])!r}, provider='cpu', threads=1)
grid = {grid!r}
feats = s.encode_image(np.load({str(tmp)!r}), image_grid=grid)
ids = s.chat.prompt_ids({QUESTION!r}, image_grid=grid)
logits, cache = s.prefill(ids, feats, s.empty_cache(), image_grid=grid)
logits, cache = s.step(s.embed_token(int(np.argmax(logits))), cache)
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print('ok', cache.length)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_manifest_image_sections(family_artifacts):
    m = json.loads((family_artifacts["idefics3"][0] / "manifest.json").read_text())
    img = m["image"]
    assert img["expand"] == "idefics3" and img["image_seq_len"] == 4
    assert img["fake_image_token"] == "<fake_token_around_image>"
    assert img["global_image_token"] == "<global-img>"
    assert img["tile_token"].format(row=2, col=3) == "<row_2_col_3>"
    assert m["preprocess"]["tiling"]["tile_size"] == 64
    assert m["preprocess"]["tiling"]["longest_edge"] == 128
    m = json.loads((family_artifacts["qwen2_vl"][0] / "manifest.json").read_text())
    assert m["image"]["expand"] == "qwen2_vl" and m["image"]["merge_size"] == 2
    assert m["decoder"]["mrope_section"] == [2, 1, 1]
    assert m["preprocess"]["tiling"]["max_pixels"] == 64 * 64
    m = json.loads((family_artifacts["qwen2_5_vl"][0] / "manifest.json").read_text())
    assert "window_count" not in m["image"] and m["image"]["window_size"] == 32
    assert m["image"]["vision_grid_inputs"][-2:] == ["window_index", "cu_window_seqlens"]


# -- raw images through the runtime: tiles (Idefics3) and patches (Qwen) ------------

SIZES = [(128, 128), (300, 90), (50, 128), (20, 20)]  # (w, h): square, wide, tall, upscaled


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("size", SIZES)
def test_runtime_preprocessing_equals_processor(family, size, family_artifacts, loaded):
    """A raw image through the runtime: pixel_values, grid and prompt ids as
    the HF processor's (Idefics3's pixel_values without the batch dim), bit
    for bit: the resizes are Pillow's, and rescale/normalize round as HF's."""
    lm = loaded[family]
    s = _session(family_artifacts[family][0])
    image = _image(*size)
    hf = _hf_ids(lm.processor, image)
    pixels, grid = s.preprocess(image)
    ref_pixels = hf["pixel_values"].numpy()
    ref_pixels = ref_pixels[0] if family == "idefics3" else ref_pixels  # (1, N, 3, S, S)
    assert grid == lm.family.image_grid(lm.processor, image, hf)
    assert pixels.shape == ref_pixels.shape and pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, ref_pixels)
    assert s.chat.prompt_ids(QUESTION, image_grid=grid) == hf["input_ids"][0].tolist()


# (family, (w, h)): square, wide and tall images whose 8 greedy tokens hold no
# image token (PyTorch's recompute cannot take one) and no early stop token;
# Qwen2.5-VL's with 4, 3 and 6 attention windows.
GENERATE_CASES = [("idefics3", (128, 128)), ("idefics3", (300, 90)), ("idefics3", (50, 128)),
                  ("qwen2_vl", (128, 128)), ("qwen2_vl", (40, 120)), ("qwen2_5_vl", (200, 64)),
                  ("qwen2_5_vl", (50, 128)), ("qwen2_5_vl", (240, 30))]


@pytest.mark.parametrize("family,size", GENERATE_CASES)
def test_generate_on_raw_image_equals_torch(family, size, family_artifacts, loaded):
    """session.generate on a raw image = PyTorch greedy (full recompute) on
    the HF processor's inputs for it, up to the first stop token."""
    from vlmedge.export.validate import _torch_greedy

    lm = loaded[family]
    s = _session(family_artifacts[family][0])
    image = _image(*size)
    ref, _ = _torch_greedy(torch, lm.model, lm.family.hf_inputs(lm.processor, image, QUESTION), 8)
    stops = [i for i, t in enumerate(ref) if t in s.chat.stop_token_ids]
    want = ref[:stops[0]] if stops else ref
    r = s.generate(image, QUESTION, max_new_tokens=8)
    assert r.token_ids == want, (r.token_ids, ref)
    assert r.stop_reason == ("stop_token" if stops else "max_new_tokens")
    for k in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms"):
        assert r.timings[k] > 0, k


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_stream_and_ask_on_raw_image(family, family_artifacts):
    """stream() joins to generate()'s text; ask() (shared image prefix, for
    Qwen its mrope offset carried in the cache) answers as generate()."""
    s = _session(family_artifacts[family][0])
    image = scenes.make_scene(7).image
    qs = [QUESTION, "describe the image."]
    want = [s.generate(image, q, max_new_tokens=6) for q in qs]
    assert "".join(s.stream(image, qs[0], max_new_tokens=6)) == want[0].text
    answers = s.ask(image, qs, max_new_tokens=6)
    assert [a.token_ids for a in answers] == [w.token_ids for w in want]
    ids = s.chat.prompt_ids(qs[0], image_grid=s.preprocess(image)[1])
    last_image_token = max(i for i, t in enumerate(ids) if t == s.chat.image_token_id)
    assert answers[0].timings["shared_tokens"] > last_image_token


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_raw_image_generation_without_torch(family, family_artifacts, tmp_path):
    """generate() on an image file with torch and transformers blocked from
    import gives the tokens it gives here."""
    art = family_artifacts[family][0]
    path = tmp_path / "wide.png"
    _image(300, 90).save(path)
    want = _session(art).generate(str(path), QUESTION, max_new_tokens=8).token_ids
    code = f"""
{PRELUDE}import json
from vlmedge.runtime import VLMSession
s = VLMSession({str(art)!r}, provider='cpu', threads=1)
r = s.generate({str(path)!r}, {QUESTION!r}, max_new_tokens=8)
assert 'torch' not in sys.modules and 'transformers' not in sys.modules
print(json.dumps(r.token_ids))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == want


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_vlm_run_on_raw_image(family, family_artifacts, tmp_path):
    art = family_artifacts[family][0]
    path = tmp_path / "scene.png"
    scenes.make_scene(5).image.save(path)
    want = _session(art).generate(str(path), QUESTION, max_new_tokens=4).token_ids
    r = subprocess.run([str(Path(sys.executable).parent / "vlm-run"), str(art), "--image",
                        str(path), "--prompt", QUESTION, "-n", "4", "--json", "--provider", "cpu",
                        "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == want and "preprocess_ms" in out["timings"]


def test_qwen2_5_vl_tensorrt_plan_covers_every_window_count(family_artifacts):
    """The TensorRT plan's vision profile ranges over window counts too (1 to
    8 windows: a 2 x 16 merged grid, within 16 image tokens) and says so."""
    from vlmedge.export.trt import profiles

    m = manifest.load(family_artifacts["qwen2_5_vl"][0]).to_dict()
    vision = profiles.make_plan(m, profiles.Limits(max_context=128))["components"]["vision"]
    assert vision["profiles"][0]["dims"]["num_window_edges"] == [2, 5, 9]
    assert vision["profiles"][0]["shapes"]["cu_window_seqlens"] == \
        {"min": [2], "opt": [5], "max": [9]}
    assert "1..16 image tokens" in vision["covers"] and "1..8 attention windows" in vision["covers"]
    # An artifact whose graph fixes the window count: a plan for that count, said so.
    spec = next(i for i in m["components"]["vision"]["inputs"] if i["name"] == "cu_window_seqlens")
    spec["shape"] = [5]
    vision = profiles.make_plan(m, profiles.Limits(max_context=128))["components"]["vision"]
    assert "num_window_edges" not in vision["profiles"][0]["dims"]
    assert "exactly 4 attention windows" in vision["covers"]


def test_tiling_preprocessor_needs_preprocess_and_a_known_method(family_artifacts):
    """__call__ would drop the grid: a one-line error pointing to preprocess();
    an unknown tiling method is refused when the config is read."""
    from vlmedge.runtime.preprocess import ImagePreprocessor

    m = manifest.load(family_artifacts["idefics3"][0])
    pp = ImagePreprocessor(m.preprocess)
    with pytest.raises(UserInputError, match="preprocess"):
        pp(np.zeros((8, 8, 3), np.uint8))
    for bad in ({"method": "llava_next"}, {"method": "idefics3", "tile_size": 64}, "tiles"):
        with pytest.raises(UserInputError, match="tiling"):
            ImagePreprocessor({**m.preprocess, "tiling": bad})


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_torch_reference_encodes_the_image_once_where_positions_are_1d(family, loaded):
    """Validation's PyTorch greedy (no KV cache) runs the vision tower once per
    prompt for 1-D-position decoders, with the same tokens and first logits as
    recomputing everything each step; Qwen2-VL (mrope) still recomputes all."""
    from vlmedge.export.validate import _torch_greedy

    lm = loaded[family]
    hf = lm.family.hf_inputs(lm.processor, _image(128, 128), QUESTION)
    calls = []
    vision = lm.model.model.vision_model if family == "idefics3" else lm.model.model.visual
    h = vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        fast, fast_first = _torch_greedy(torch, lm.model, hf, 6, lm.family)
        n_fast = len(calls)
        slow, slow_first = _torch_greedy(torch, lm.model, hf, 6)
    finally:
        h.remove()
    assert fast == slow
    np.testing.assert_allclose(fast_first, slow_first, rtol=0, atol=1e-5)
    assert len(calls) - n_fast == 6  # the reference recompute: once per token
    assert n_fast == (1 if family == "idefics3" else 6)


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_image_token_budget_through_the_session(family, family_artifacts):
    """max_image_tokens on a tiled / patched family: the image takes at most
    the budget (far fewer tokens than by default) and the answer still runs
    through the same graphs."""
    s = _session(family_artifacts[family][0])
    img = np.asarray(scenes.make_scene(5).image.convert("RGB").resize((384, 256)))
    full = s.generate(img, QUESTION, max_new_tokens=3)
    budget = 4 if family == "idefics3" else 6
    small = s.generate(img, QUESTION, max_new_tokens=3, max_image_tokens=budget)
    assert small.timings["image_tokens"] <= budget < full.timings["image_tokens"]
    assert small.timings["vision_ms"] > 0 and len(small.token_ids) >= 1
    enc = s.encode(img, max_image_tokens=budget)
    assert s.generate(enc, QUESTION, max_new_tokens=3).token_ids == small.token_ids
