"""InternVL (InternVLForConditionalGeneration, model_type "internvl":
transformers-native InternVL2.5 / InternVL3, e.g. OpenGVLab/InternVL3-1B-hf).

What differs from the other tiling families:
- The vision tower is InternViT (InternVLVisionModel): a class token, learned
  absolute positions, pre-norm layers whose attention and MLP outputs are
  scaled by learned per-channel factors (layer scale), optional qk-norm. The
  features of `vision_feature_layer` lose the class token ("default"
  strategy), are pixel-shuffled (downsample_ratio 0.5: 2 x 2 neighbouring
  patches concatenated, (S/p)^2 -> (S/p)^2 / 4 tokens of 4x the width) and
  go through a LayerNorm + 2-layer GELU MLP to the text width. The vision
  graph is all of that over tiles: (N, 3, S, S) -> (N, T, D), T =
  image_seq_length (256 for 448 px tiles of 14 px patches).
- The image processor (GotOcr2ImageProcessor, crop_to_patches, which
  InternVLProcessor turns on whatever preprocessor_config.json says) picks
  the rows x cols grid of min..max_patches tiles closest to the image's
  aspect ratio, resizes the whole image to it, cuts the tiles row-major and
  appends a thumbnail (the whole image at S x S) when it split: tiling
  "internvl" in runtime/preprocess.py, no padding, so the runtime's pixels
  are the processor's bit for bit. The image grid is (rows, cols).
- The prompt: the chat template writes <IMG_CONTEXT> once per image; the
  processor makes it <img> + image_seq_length x <IMG_CONTEXT> per tile +
  </img> (expansion "internvl" in runtime/chat.py).

The decoder is Qwen2 (InternVL3) or Llama (InternVL2.5 with InternLM2
weights converted): base.DecoderWrapper, traced with the rotary embedding's
"dynamic" NTK scaling (InternVL3's rope_scaling, factor 2) read as the plain
rope it is within the artifact's context (see _plain_rope).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any

from vlmedge.errors import ModelDirError, UnsupportedArchitectureError

from .base import DecoderWrapper, Family, GraphSpec, normalization_facts, torch
from .qwen2_vl import _chat_template, _image_only

nn = torch.nn

# Decoders base.DecoderWrapper serves as they are (exported and validated here).
TEXT_MODELS = ("qwen2", "llama")


def _refuse(what: str, expected: str, got, hint: str = "see README 'Supported models'"):
    raise UnsupportedArchitectureError(what, expected=expected, got=repr(got)[:80], hint=hint)


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class InternVLVision(nn.Module):
    """pixel_values (N, 3, S, S) tiles -> image_features (N, T, D_text).

    As InternVLModel.get_image_features: InternViT's hidden state of
    vision_feature_layer (N, 1 + (S/p)^2, C), class token dropped ("default"),
    laid out (N, S/p, S/p, C), pixel-shuffled to (N, S/p*r, S/p*r, C/r^2)
    (r = downsample_ratio), flattened to (N, T, C/r^2) and projected."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.pixel_shuffle = model.model.pixel_shuffle
        self.layer = int(cfg.vision_feature_layer)
        self.strategy = cfg.vision_feature_select_strategy
        self.ratio = float(cfg.downsample_ratio)
        size, patch = _pair(cfg.vision_config.image_size), _pair(cfg.vision_config.patch_size)
        self.side = size[0] // patch[0]  # patches a side; tiles are square (check_config)

    def forward(self, pixel_values):
        if self.layer == -1:
            hidden = self.tower(pixel_values=pixel_values).last_hidden_state
        else:
            hidden = self.tower(pixel_values=pixel_values,
                                output_hidden_states=True).hidden_states[self.layer]
        if self.strategy == "default":
            hidden = hidden[:, 1:, :]  # (N, (S/p)^2, C): the class token dropped
        n = hidden.shape[0]
        grid = hidden.reshape(n, self.side, self.side, hidden.shape[-1])
        shuffled = self.pixel_shuffle(grid, scale_factor=self.ratio)  # (N, s*r, s*r, C/r^2)
        return self.projector(shuffled.reshape(n, -1, shuffled.shape[-1]))


@contextlib.contextmanager
def _plain_rope(language_model):
    """Dynamic NTK rope ("dynamic" rope_type) traced as the default rope.

    transformers' dynamic update branches on max(position_ids) + 1 against
    max_position_embeddings (a data-dependent `if` torch.export cannot trace)
    and rescales inv_freq only past it; below, inv_freq is the one computed at
    init, which for seq_len = max_position_embeddings is the default rope's
    (base * (factor - (factor - 1)) ** (d / (d - 2)) = base). The artifact
    serves at most max_position_embeddings tokens (Family.max_context), so
    the traced graph is exact wherever it runs; validation compares it with
    the eager model, which takes the dynamic path."""
    rotary = getattr(language_model, "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(rope_type, str) or "dynamic" not in rope_type:
        yield
        return
    rotary.rope_type = "default"
    try:
        yield
    finally:
        rotary.rope_type = rope_type


class PlainRopeDecoder(DecoderWrapper):
    """base.DecoderWrapper whose rotary embedding skips the dynamic update."""

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        with _plain_rope(self.language_model):
            return super().forward(inputs_embeds, attention_mask, position_ids, past)


class InternVL(Family):
    name = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    model_types = ("internvl",)

    def check_config(self, config) -> None:
        vc, tc = config.vision_config, config.text_config
        if getattr(tc, "model_type", None) not in TEXT_MODELS:
            _refuse(f"unsupported language model for the {self.name} family",
                    f"a text_config of model_type {' or '.join(TEXT_MODELS)}",
                    getattr(tc, "model_type", None))
        size, patch = _pair(vc.image_size), _pair(vc.patch_size)
        if size[0] != size[1] or patch[0] != patch[1] or size[0] % patch[0]:
            _refuse("InternVL tiles must be square and a whole number of patches",
                    "square image_size and patch_size, image_size a multiple of patch_size",
                    f"image_size {size}, patch_size {patch}")
        side, ratio = size[0] // patch[0], float(config.downsample_ratio)
        if ratio <= 0 or (side * ratio) % 1 or (1 / ratio) % 1:
            _refuse("unsupported downsample_ratio for the patch grid",
                    f"1/k for an integer k dividing {side} patches a side",
                    config.downsample_ratio)
        if not isinstance(config.vision_feature_layer, int):
            _refuse("InternVL reads one vision_feature_layer",
                    "an int (get_image_features takes no list)", config.vision_feature_layer)
        if config.vision_feature_select_strategy not in ("default", "full"):
            _refuse("unknown vision_feature_select_strategy", "'default' or 'full'",
                    config.vision_feature_select_strategy)
        if config.vision_feature_select_strategy == "full":
            _refuse("the 'full' strategy keeps the class token, which pixel shuffle cannot lay "
                    "out on the patch grid", "vision_feature_select_strategy 'default'", "full")

    def load_processor(self, path, trust_remote_code: bool = False):
        """InternVLProcessor without its video processor (transformers' video
        processors need torchvision; images never reach them), with the
        settings of processor_config.json."""
        from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor

        path = Path(path)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        for attr in ("start_image_token", "end_image_token", "context_image_token"):
            if not getattr(tok, attr, None):
                raise ModelDirError(f"the tokenizer does not name InternVL's {attr}",
                                    expected="start_image_token, end_image_token and "
                                             "context_image_token in tokenizer_config.json",
                                    got=f"{attr} missing",
                                    hint="use the -hf checkpoint's tokenizer files")
        ip = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        cfg = path / "processor_config.json"
        kwargs = json.loads(cfg.read_text()) if cfg.is_file() else {}
        return _image_only(InternVLProcessor)(
            image_processor=ip, tokenizer=tok, video_processor=None,
            chat_template=_chat_template(path, tok),
            **{k: v for k, v in kwargs.items() if k == "image_seq_length"})

    # -- the processor's tiling, read and checked once -----------------------
    def _tile_size(self, model) -> int:
        return _pair(model.config.vision_config.image_size)[0]

    @staticmethod
    def _tiling(processor) -> dict[str, Any]:
        """The tiling the processor applies when called: InternVLProcessor's
        own image defaults (crop_to_patches=True) override the image
        processor's settings, so ask the same merge its __call__ does."""
        ip = processor.image_processor
        if not type(ip).__name__.startswith("GotOcr2ImageProcessor"):
            raise ModelDirError("unsupported image processor for InternVL",
                                expected="GotOcr2ImageProcessor (InternVL2.5 / InternVL3 -hf)",
                                got=type(ip).__name__, hint="see README 'Supported models'")
        size = (int(ip.size["height"]), int(ip.size["width"]))
        if not ip.do_resize or size[0] != size[1]:
            raise ModelDirError("the image processor's tiles are not square",
                                expected="do_resize with size height == width",
                                got=f"do_resize={ip.do_resize}, size={size}")
        merged = processor._merge_kwargs(
            tokenizer_init_kwargs=processor.tokenizer.init_kwargs)["images_kwargs"]

        def setting(key):
            v = merged.get(key)
            return getattr(ip, key) if v is None else v

        return {"method": "internvl", "tile_size": size[0],
                "min_patches": int(setting("min_patches")),
                "max_patches": int(setting("max_patches")),
                "crop_to_patches": bool(setting("crop_to_patches")),
                "use_thumbnail": True}  # crop_image_to_patches' default; _preprocess keeps it

    # -- graphs ------------------------------------------------------------
    def decoder_graph(self, model) -> GraphSpec:
        spec = super().decoder_graph(model)
        wrapper = spec.module
        return dataclasses.replace(spec, module=PlainRopeDecoder(
            wrapper.language_model, wrapper.lm_head, wrapper.config))

    def vision_graph(self, model, processor) -> GraphSpec:
        s = self._tile_size(model)
        pixels = torch.randn(3, 3, s, s)  # 3 tiles: the batch is traced dynamic
        return GraphSpec("vision", InternVLVision(model), (pixels,), ["pixel_values"],
                         ["image_features"], {"pixel_values": {0: "batch"}},
                         {"image_features": {0: "batch"}})

    # -- validation inputs ---------------------------------------------------
    def image_grid(self, processor, image, hf_inputs: dict):
        """(rows, cols) as the processor's get_optimal_tiled_canvas chose it
        (transformers' own function: the runtime's internvl_grid is checked
        against it); (1, 1) when it does not crop."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas)

        t = self._tiling(processor)
        if not t["crop_to_patches"] or t["max_patches"] <= 1:
            return 1, 1
        w, h = image.size
        cols, rows = get_optimal_tiled_canvas((h, w), (t["tile_size"], t["tile_size"]),
                                              t["min_patches"], t["max_patches"])
        return int(rows), int(cols)

    def torch_image_features(self, model, hf_inputs: dict):
        cfg = model.config
        out = model.model.get_image_features(
            pixel_values=hf_inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return out.pooler_output  # (N tiles, T, D)

    # -- manifest facts ----------------------------------------------------
    def preprocess_config(self, processor) -> dict[str, Any]:
        return {**normalization_facts(processor.image_processor, "bicubic"),
                "resize": "none",  # every resize is part of the tiling
                "tiling": self._tiling(processor)}

    def image_facts(self, model, processor) -> dict[str, Any]:
        s = self._tile_size(model)
        tiling = self._tiling(processor)
        if tiling["tile_size"] != s:
            raise ModelDirError("the image processor's tile size differs from the vision "
                                "tower's", expected=f"size {s} x {s} (vision_config.image_size)",
                                got=str(tiling["tile_size"]),
                                hint="fix size in preprocessor_config.json")
        with torch.no_grad():
            feats = InternVLVision(model)(torch.zeros(1, 3, s, s))
        seq_len = int(processor.image_seq_length)
        if seq_len != feats.shape[1]:
            raise ModelDirError("the processor's image_seq_length disagrees with the model",
                                expected=f"{feats.shape[1]} tokens per tile (vision tower)",
                                got=str(seq_len),
                                hint="fix image_seq_length in processor_config.json")
        if int(processor.image_token_id) != int(model.config.image_token_id):
            raise ModelDirError("the tokenizer's <IMG_CONTEXT> id differs from the model's "
                                "image_token_id", expected=str(model.config.image_token_id),
                                got=str(processor.image_token_id))
        return {"image_token": processor.image_token,
                "image_token_id": int(model.config.image_token_id),
                "tokens_per_image": seq_len,  # per tile; an image has rows*cols (+1) tiles
                "feature_dim": int(feats.shape[2]),
                "image_placeholder": processor.image_token,
                "expand": "internvl",
                "image_seq_len": seq_len,
                "tile_size": s,
                "image_start_token": processor.start_image_token,
                "image_end_token": processor.end_image_token}
