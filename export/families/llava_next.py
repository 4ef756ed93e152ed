"""LLaVA-NeXT (LlavaNextForConditionalGeneration: CLIP-L/336 + Llama, Mistral,
Vicuna) and LLaVA-OneVision (LlavaOnevisionForConditionalGeneration: SigLIP
so400m/384 + Qwen2): the "anyres" design.

The processor tiles an image at the best of the model's grid pinpoints
(runtime/anyres.py says how): pixel_values (1, N, 3, S, S), N = rows * cols
+ 1 with the whole image first, and image_sizes (1, 2). The vision graph is
LLaVA's own tower + projector over tiles, (N, 3, S, S) -> (N, side^2, D), as
idefics3 takes tiles. What follows depends on the ORIGINAL image size
(unpadding, OneVision's anyres_max_K shrinking, a newline per row), so the
runtime does it on the host in numpy (runtime/anyres.py), with the learned
image_newline vector (D,) carried in the manifest (image.image_newline; a
few kilobytes, read with the manifest: no extra file, no extra graph output
for TensorRT to refuse). The runtime's image grid is (h, w, bh, bw): the
original size and the pinpoint it was tiled at.

The decoders are Llama / Mistral / Qwen2: base.DecoderWrapper as they are.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vlmedge.errors import ModelDirError, UnsupportedArchitectureError
from vlmedge.runtime import anyres

from .base import Family, GraphSpec, normalization_facts, torch
from .llava import VISION_TOWERS, LlavaVision
from .qwen2_vl import _chat_template, _image_only


def _refuse(what: str, expected: str, got, hint: str = "see README 'Supported models'"):
    raise UnsupportedArchitectureError(what, expected=expected, got=repr(got)[:80], hint=hint)


def _sides(sizes) -> set[int]:
    """The side lengths an HF size (dict or SizeDict, or None) asks for."""
    if sizes is None:
        return set()
    return {int(sizes.get(k)) for k in ("height", "width", "shortest_edge") if sizes.get(k)}


class LlavaNext(Family):
    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)

    def check_config(self, config) -> None:
        tower = getattr(getattr(config, "vision_config", None), "model_type", None)
        if tower not in VISION_TOWERS:
            _refuse(f"unsupported vision tower for the {self.name} family",
                    f"a vision_config of model_type {' or '.join(VISION_TOWERS)}", tower)
        pins, tile = config.image_grid_pinpoints, config.vision_config.image_size
        if not pins or any(v % tile for p in pins for v in p):
            _refuse("image_grid_pinpoints must be multiples of the vision tower's image size",
                    f"[height, width] pairs, multiples of {tile}", pins)

    # -- the image processor's tiling, read and checked once ----------------
    def _tile_size(self, model) -> int:
        return int(model.config.vision_config.image_size)

    def _pinpoints(self, model, processor) -> list[list[int]]:
        """The processor's pinpoints, which must be the model's: the processor
        tiles by its own, the model packs by its own."""
        pins = [[int(h), int(w)] for h, w in processor.image_processor.image_grid_pinpoints]
        if pins != [[int(h), int(w)] for h, w in model.config.image_grid_pinpoints]:
            raise ModelDirError("the image processor's image_grid_pinpoints differ from the "
                                "model's", expected="the config.json list",
                                got=f"{len(pins)} pinpoints in preprocessor_config.json",
                                hint="copy image_grid_pinpoints from config.json")
        return pins

    def _check_processor(self, model, processor) -> None:
        """Every tile reaches the tower at S x S with no further resize or crop."""
        ip, s = processor.image_processor, self._tile_size(model)
        size, crop = _sides(ip.size), _sides(getattr(ip, "crop_size", None))
        if not ip.do_resize or (size | (crop if ip.do_center_crop else set())) != {s}:
            raise ModelDirError("the image processor's tile size differs from the vision tower's",
                                expected=f"do_resize with size and crop_size {s}",
                                got=f"do_resize={ip.do_resize}, size={sorted(size)}, "
                                    f"crop_size={sorted(crop)}")

    # -- graphs ------------------------------------------------------------
    def vision_graph(self, model, processor) -> GraphSpec:
        s = self._tile_size(model)
        pixels = torch.randn(3, 3, s, s)  # 3 tiles: the batch is traced dynamic
        return GraphSpec("vision", LlavaVision(model), (pixels,), ["pixel_values"],
                         ["image_features"], {"pixel_values": {0: "batch"}},
                         {"image_features": {0: "batch"}})

    # -- validation inputs ---------------------------------------------------
    def vision_args(self, hf_inputs: dict) -> tuple:
        return (hf_inputs["pixel_values"][0],)  # (N, 3, S, S): one image, no batch padding

    def image_grid(self, processor, image, hf_inputs: dict):
        h, w = (int(v) for v in hf_inputs["image_sizes"][0].tolist())
        pins = processor.image_processor.image_grid_pinpoints
        return (h, w, *anyres.select_best_resolution(h, w, pins))

    def torch_image_features(self, model, hf_inputs: dict):
        out = model.model.get_image_features(pixel_values=hf_inputs["pixel_values"],
                                             image_sizes=hf_inputs["image_sizes"])
        return out.pooler_output[0][None]  # (1, M, D): the packed features

    # -- manifest facts ----------------------------------------------------
    def anyres_max_tiles(self, model) -> int | None:
        return None  # LLaVA-NeXT keeps the whole unpadded map

    def preprocess_config(self, processor) -> dict[str, Any]:
        ip = processor.image_processor
        return {
            **normalization_facts(ip, "bicubic"),
            "resize": "none",  # every resize is part of the tiling
            "tiling": {"method": "anyres", "tile_size": int(self._tile_size_of(ip)),
                       "grid_pinpoints": [[int(h), int(w)] for h, w in ip.image_grid_pinpoints]},
        }

    @staticmethod
    def _tile_size_of(ip) -> int:
        """The processor's patch size, as its _preprocess picks it."""
        for sizes in (getattr(ip, "crop_size", None), ip.size):
            for key in ("height", "shortest_edge"):
                if sizes is not None and sizes.get(key):
                    return int(sizes.get(key))
        raise ModelDirError("the image processor has no tile size", expected="size or crop_size",
                            got=repr(ip.size)[:60])

    def image_facts(self, model, processor) -> dict[str, Any]:
        self._check_processor(model, processor)
        pins = self._pinpoints(model, processor)
        s, p = self._tile_size(model), int(model.config.vision_config.patch_size)
        with torch.no_grad():
            feats = LlavaVision(model)(torch.zeros(1, 3, s, s))
        if feats.shape[1] != (s // p) ** 2:  # CLIP's class token kept ("full" strategy)
            _refuse("anyres packing needs one feature per patch",
                    f"{(s // p) ** 2} features per tile (vision_feature_select_strategy "
                    f"'default' for CLIP)", int(feats.shape[1]))
        newline = model.model.image_newline.detach().float().reshape(-1)
        return {"image_token": processor.image_token,
                "image_token_id": int(model.config.image_token_id),
                "tokens_per_image": int(feats.shape[1]),  # the base tile's; an image has more
                "feature_dim": int(feats.shape[2]),
                "image_placeholder": processor.image_token,
                "expand": "anyres",
                "tile_size": s,
                "patch_size": p,
                "grid_pinpoints": pins,
                "anyres_max_tiles": self.anyres_max_tiles(model),
                "image_newline": [float(v) for v in newline.tolist()]}


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)

    def check_config(self, config) -> None:
        super().check_config(config)
        self.anyres_max_tiles_of(config)

    @staticmethod
    def anyres_max_tiles_of(config) -> int:
        ratio = getattr(config, "vision_aspect_ratio", "anyres_max_9")
        match = re.fullmatch(r"anyres_max_([1-9][0-9]*)", str(ratio))
        if not match:
            _refuse("unsupported vision_aspect_ratio for llava_onevision",
                    "'anyres_max_K' (K tiles' worth of features at most)", ratio)
        return int(match.group(1))

    def anyres_max_tiles(self, model) -> int:
        return self.anyres_max_tiles_of(model.config)

    def load_processor(self, path, trust_remote_code: bool = False):
        """LlavaOnevisionProcessor without its video processor (transformers'
        video processors need torchvision; images never reach them), with
        the settings of processor_config.json."""
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor

        path = Path(path)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        ip = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        cfg = path / "processor_config.json"
        kwargs = json.loads(cfg.read_text()) if cfg.is_file() else {}
        keep = ("num_image_tokens", "vision_feature_select_strategy", "image_token",
                "video_token", "vision_aspect_ratio")
        return _image_only(LlavaOnevisionProcessor)(
            image_processor=ip, tokenizer=tok, video_processor=None,
            chat_template=_chat_template(path, tok),
            **{k: v for k, v in kwargs.items() if k in keep})

    def image_facts(self, model, processor) -> dict[str, Any]:
        facts = super().image_facts(model, processor)
        if getattr(processor, "vision_aspect_ratio", None) != model.config.vision_aspect_ratio \
                or processor.num_image_tokens != facts["tokens_per_image"]:
            raise ModelDirError("the processor's vision_aspect_ratio or num_image_tokens differ "
                                "from the model's",
                                expected=f"{model.config.vision_aspect_ratio}, "
                                         f"{facts['tokens_per_image']}",
                                got=f"{processor.vision_aspect_ratio}, "
                                    f"{processor.num_image_tokens}",
                                hint="fix processor_config.json")
        return facts
