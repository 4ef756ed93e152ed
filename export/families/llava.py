"""LLaVA (LlavaForConditionalGeneration): CLIP or SigLIP tower, feature layer
and select strategy, MLP projector, Llama-style decoder. The demo model's
family, and LLaVA-1.5's."""
from __future__ import annotations

from typing import Any

from vlmedge.errors import UnsupportedArchitectureError

from .base import Family, GraphSpec, torch

nn = torch.nn

# Towers whose forward LlavaVision calls as (pixel_values, output_hidden_states)
# on a fixed-size (N, 3, H, W) batch. Pixtral takes per-image sizes and
# variable patch counts (another vision graph): refused, not half-exported.
VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")


class LlavaVision(nn.Module):
    """pixel_values (N, 3, H, W) float32 -> image_features (N, T_img, D_text).

    T_img = (H/patch) * (W/patch), plus the class token when the select
    strategy is "full"; the feature layer(s) are read from hidden_states as
    LlavaModel.get_image_features does, then projected."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layer = cfg.vision_feature_layer
        self.strategy = cfg.vision_feature_select_strategy

    def forward(self, pixel_values):
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        picked = [hidden[i] for i in layers]
        if self.strategy == "default":
            picked = [h[:, 1:] for h in picked]  # drop CLIP's class token
        return self.projector(torch.cat(picked, dim=-1))


class Llava(Family):
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

    def check_config(self, config) -> None:
        tower = getattr(getattr(config, "vision_config", None), "model_type", None)
        if tower not in VISION_TOWERS:
            raise UnsupportedArchitectureError(
                "unsupported vision tower for the llava family",
                expected=f"a vision_config of model_type {' or '.join(VISION_TOWERS)}",
                got=repr(tower), hint="see README 'Supported models'")

    def vision_graph(self, model, processor) -> GraphSpec:
        ip = processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        size = crop.get("height") or ip.size.get("shortest_edge") or ip.size.get("height")
        pixels = torch.randn(2, 3, size, crop.get("width") or size)
        return GraphSpec("vision", LlavaVision(model), (pixels,), ["pixel_values"],
                         ["image_features"], {"pixel_values": {0: "batch"}},
                         {"image_features": {0: "batch"}})

    def torch_image_features(self, model, hf_inputs: dict):
        feats = model.model.get_image_features(
            pixel_values=hf_inputs["pixel_values"],
            vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy)
        feats = getattr(feats, "pooler_output", feats)
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def preprocess_config(self, processor) -> dict[str, Any]:
        # The runtime's own reading of the HF image processor config, so export
        # and deployment cannot disagree about what a key means.
        from vlmedge.runtime.preprocess import config_from_hf
        return {**config_from_hf(processor.image_processor.to_dict()), "tiling": None}

    def image_facts(self, model, processor) -> dict[str, Any]:
        tok = processor.tokenizer
        image_token = getattr(processor, "image_token", "<image>")
        with torch.no_grad():
            spec = self.vision_graph(model, processor)
            feats = spec.module(spec.args[0][:1])
        return {"image_token": image_token,
                "image_token_id": int(model.config.image_token_id),
                "tokens_per_image": int(feats.shape[1]),
                "feature_dim": int(feats.shape[2]),
                "image_placeholder": image_token,
                "expand": "repeat"}  # <image> -> tokens_per_image copies of it
