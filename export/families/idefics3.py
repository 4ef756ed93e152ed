"""Idefics3 / SmolVLM (Idefics3ForConditionalGeneration): a SigLIP-style
vision tower, a pixel-shuffle connector and a Llama decoder.

The processor splits an image into a rows x cols grid of square tiles plus
a global (whole-image) tile, all max_image_size square, and writes per tile
<fake_token_around_image><row_r_col_c> + image_seq_len <image> tokens
(runtime/chat.py reproduces it from the grid). The vision graph sees only
real tiles (N, 3, S, S): the processor's padding (all-zero tiles, masked
pixels) exists only to batch several images of different tile counts, and a
full tile has an all-true patch mask, the tower's default.
"""
from __future__ import annotations

from typing import Any

from vlmedge.errors import ModelDirError

from .base import Family, GraphSpec, normalization_facts, torch

nn = torch.nn



class Idefics3Vision(nn.Module):
    """pixel_values (N, 3, S, S) tiles -> image_features (N, image_seq_len, D_text).

    SigLIP tower over (S/patch)^2 patches, then pixel shuffle (scale_factor^2
    neighbouring patches concatenated: T = (S/patch)^2 / scale^2 tokens) and
    the connector's linear projection to the text width."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_model
        self.connector = model.model.connector

    def forward(self, pixel_values):
        # The tower's own forward with its default patch mask (all true: every
        # tile is whole), taken apart so the encoder gets no attention mask. The
        # tower would build an all-true (N, 1, P, P) mask and hand it to SDPA,
        # which the ONNX export spells as an additive mask per layer plus a
        # NaN guard over the (N, H, P, P) probabilities (IsNaN + Where): 28% of
        # the SmolVLM-256M vision graph's time in onnxruntime for no effect on
        # the result. Without a mask it is MatMul, Softmax, MatMul: the same
        # arithmetic (HF's flash-attention path drops an all-true mask too).
        t = self.tower
        n, _, h, w = pixel_values.shape
        whole = torch.ones((n, h // t.patch_size, w // t.patch_size), dtype=torch.bool,
                           device=pixel_values.device)
        hidden = t.embeddings(pixel_values=pixel_values, patch_attention_mask=whole)
        hidden = t.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return self.connector(t.post_layernorm(hidden))           # (N, T, D_text)


class Idefics3(Family):
    name = "idefics3"
    architectures = ("Idefics3ForConditionalGeneration",)
    model_types = ("idefics3",)

    def language_model(self, model):
        return model.model.text_model

    def _tile_size(self, processor) -> int:
        return int(processor.image_processor.max_image_size["longest_edge"])

    def vision_graph(self, model, processor) -> GraphSpec:
        s = self._tile_size(processor)
        pixels = torch.randn(3, 3, s, s)  # 3 tiles: batch is traced dynamic (not 0 or 1)
        return GraphSpec("vision", Idefics3Vision(model), (pixels,), ["pixel_values"],
                         ["image_features"], {"pixel_values": {0: "batch"}},
                         {"image_features": {0: "batch"}})

    # -- validation inputs ---------------------------------------------------
    def _real_tiles(self, hf_inputs: dict):
        """(B, N_max, 3, S, S) padded -> (N, 3, S, S): drop all-zero padding tiles
        as Idefics3Model.get_image_features does."""
        px = hf_inputs["pixel_values"]
        px = px.reshape(-1, *px.shape[2:])
        real = (px == 0.0).flatten(1).sum(1) != px[0].numel()
        return px[real].contiguous()

    def vision_args(self, hf_inputs: dict) -> tuple:
        return (self._real_tiles(hf_inputs),)

    def torch_image_features(self, model, hf_inputs: dict):
        out = model.model.get_image_features(
            pixel_values=hf_inputs["pixel_values"],
            pixel_attention_mask=hf_inputs.get("pixel_attention_mask"))
        feats = torch.cat(list(out.pooler_output), dim=0)  # (N * T, D)
        tiles = self._real_tiles(hf_inputs).shape[0]
        return feats.reshape(tiles, -1, feats.shape[-1])

    def image_grid(self, processor, image, hf_inputs: dict):
        """(rows, cols) of the tile grid, (0, 0) if the image was not split:
        the processor drops them from its output, so ask its image processor."""
        info = processor.image_processor(images=image, return_row_col_info=True)
        return int(info["rows"][0][0]), int(info["cols"][0][0])

    # -- manifest facts ----------------------------------------------------
    def preprocess_config(self, processor) -> dict[str, Any]:
        ip = processor.image_processor
        return {
            **normalization_facts(ip, "lanczos"),
            # All resizing is part of the tiling: the long side to size.longest_edge,
            # both sides up to multiples of the tile, tiles cut row-major, and the
            # global tile resized from the whole image.
            "resize": "none",
            "tiling": {
                "method": "idefics3",
                "longest_edge": int(ip.size["longest_edge"]) if ip.do_resize else None,
                "tile_size": self._tile_size(processor),
                "do_image_splitting": bool(ip.do_image_splitting),
                "global_image": True,
            },
        }

    def image_facts(self, model, processor) -> dict[str, Any]:
        s = self._tile_size(processor)
        with torch.no_grad():
            feats = Idefics3Vision(model)(torch.zeros(1, 3, s, s))
        seq_len = int(processor.image_seq_len)
        if seq_len != feats.shape[1]:
            raise ModelDirError("the processor's image_seq_len disagrees with the model",
                                expected=f"{feats.shape[1]} tokens per tile (vision tower)",
                                got=str(seq_len), hint="fix image_seq_len in processor_config.json")
        return {"image_token": processor.image_token,
                "image_token_id": int(model.config.image_token_id),
                "tokens_per_image": seq_len,  # per tile; an image has rows*cols + 1 tiles
                "feature_dim": int(feats.shape[2]),
                "image_placeholder": processor.image_token,
                "expand": "idefics3",
                "image_seq_len": seq_len,
                "fake_image_token": processor.fake_image_token,
                "global_image_token": processor.global_image_tag,
                "tile_token": "<row_{row}_col_{col}>",
                "tile_size": s,
                "do_image_splitting": bool(processor.image_processor.do_image_splitting)}
