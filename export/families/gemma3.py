"""Gemma 3 (Gemma3ForConditionalGeneration, model_type "gemma3"): SigLIP
tower, average pooling to mm_tokens_per_image tokens, RMSNorm + projection,
Gemma 3 decoder.

What differs from a LLaVA-style model, and where it is handled:

- Attention is not causal everywhere. In the prompt's prefill the tokens of
  one image attend to each other both ways (transformers'
  token_type_ids_mask / blockwise_overlay), and the local layers see only
  the last sliding_window keys. The decoder graph takes attention_groups
  and builds both masks itself (base.GroupedDecoderWrapper), so the window
  is exact at any context length and the manifest's context is not capped
  at it. The local layers' cache keeps only their window (W - 1 rows, cut
  in the graph; the manifest's decoder.window_layers / window_cache), the
  global layers' the whole context: per-layer cache lengths.
- The logits may be soft-capped (final_logit_softcapping), in the graph.
- The embedding is scaled by sqrt(hidden) inside get_input_embeddings: the
  embed graph carries it.
- The prompt: Gemma3Processor replaces <start_of_image> with "\\n\\n" +
  <start_of_image> + mm_tokens_per_image <image_soft_token> + <end_of_image>
  + "\\n\\n" in the text (the manifest's "wrap" expansion).
- Preprocessing is a plain resize to the tower's size (bilinear), no crop.
  With pan-and-scan (vlm-export --pan-and-scan; off by default, as in
  Gemma3Processor's calls) an elongated image
  also gives 2..max_num_crops crops, each resized alike and encoded as one
  more image block: "Here is the original image <block> and here are some
  crops to help you see better <block> <block>" (runtime/adapters/fixed.py).
"""
from __future__ import annotations

import math
from typing import Any

from vlmedge.errors import ModelDirError, UnsupportedArchitectureError

from .base import FixedSizeImages


class Gemma3(FixedSizeImages):
    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    attention_groups = "images"

    def check_config(self, config) -> None:
        tower = getattr(getattr(config, "vision_config", None), "model_type", None)
        if tower != "siglip_vision_model":
            raise UnsupportedArchitectureError(
                "unsupported vision tower for the gemma3 family",
                expected="a vision_config of model_type siglip_vision_model", got=repr(tower),
                hint="see README 'Supported models'")
        if getattr(config.text_config, "use_bidirectional_attention", False):
            raise UnsupportedArchitectureError(
                "Gemma 3 with bidirectional attention everywhere (an embedding model) is not "
                "a generator", expected="use_bidirectional_attention false",
                got="true", hint="export a generative Gemma 3 checkpoint")

    def configure_processor(self, processor, pan_and_scan: bool = False) -> None:
        """Pan-and-scan on (--pan-and-scan, or do_pan_and_scan true in
        preprocessor_config.json) for every call of the processor, as
        `processor(..., do_pan_and_scan=True)` does: Gemma3Processor's own
        call default (False) overrides the image processor's config, so the
        processor is the one switch the validation, the calibration and the
        manifest all read."""
        if pan_and_scan or getattr(processor.image_processor, "do_pan_and_scan", None):
            processor.images_kwargs = {**processor.images_kwargs, "do_pan_and_scan": True}

    def preprocess_config(self, processor) -> dict[str, Any]:
        """The resize to the tower's size; with pan-and-scan, also the crops
        (the runtime's "pan_and_scan" tiling: the whole image, then 2 to
        max_num_crops crops of an elongated image, each resized alike), with
        the settings the processor's calls use."""
        cfg = super().preprocess_config(processor)
        kw = getattr(processor, "images_kwargs", {}) or {}
        if not kw.get("do_pan_and_scan"):
            return cfg
        n, least, ratio = (kw.get("pan_and_scan_max_num_crops"),
                           kw.get("pan_and_scan_min_crop_size"),
                           kw.get("pan_and_scan_min_ratio_to_activate"))
        # the runtime's bounds (runtime/preprocess.py _check_pan_and_scan), checked
        # here so a model the runtime would refuse fails before the export
        from vlmedge.runtime.preprocess import MAX_CONFIG_SIZE, MAX_PAN_AND_SCAN_CROPS
        if not (_int(n) and 1 <= n <= MAX_PAN_AND_SCAN_CROPS
                and _int(least) and 1 <= least <= MAX_CONFIG_SIZE
                and isinstance(ratio, (int, float)) and not isinstance(ratio, bool)
                and math.isfinite(ratio) and ratio >= 1):
            raise ModelDirError("bad pan-and-scan settings in the Gemma 3 processor",
                                expected=f"pan_and_scan_max_num_crops an int in "
                                         f"1..{MAX_PAN_AND_SCAN_CROPS}, _min_crop_size an int "
                                         f"in 1..{MAX_CONFIG_SIZE}, _min_ratio_to_activate a "
                                         f"finite number >= 1",
                                got=f"{n!r}, {least!r}, {ratio!r}",
                                hint="Gemma3Processor's defaults are 4, 256 and 1.2")
        if cfg["resize"] != "exact":
            raise ModelDirError("Gemma 3 pan-and-scan needs a fixed image size",
                                expected='size {"height", "width"}', got=repr(cfg["resize"]))
        return {**cfg, "tiling": {"method": "pan_and_scan", "size": list(cfg["size"]),
                                  "min_crop_size": least, "max_num_crops": n,
                                  "min_ratio": float(ratio)}}

    def image_grid(self, processor, image, hf_inputs: dict):
        """The crop count with pan-and-scan (the processor returns the whole
        image and its crops as pixel_values rows), else None."""
        n = int(hf_inputs["pixel_values"].shape[0]) - 1
        return n if n > 0 else None

    def image_facts(self, model, processor) -> dict[str, Any]:
        tok = processor.tokenizer
        feats = self.sample_features(model, processor)
        n = int(processor.image_seq_length)
        if n != feats.shape[1]:
            raise ModelDirError("the processor's image_seq_length disagrees with the model",
                                expected=f"{feats.shape[1]} (mm_tokens_per_image)", got=str(n),
                                hint="fix image_seq_length in processor_config.json")
        return {"image_token": tok.image_token,
                "image_token_id": int(model.config.image_token_id),
                "tokens_per_image": n,
                "feature_dim": int(feats.shape[2]),
                "image_placeholder": tok.boi_token,
                "expand": "wrap",
                # Gemma3Processor.full_image_sequence around the image tokens
                "image_start_token": f"\n\n{tok.boi_token}",
                "image_end_token": f"{tok.eoi_token}\n\n"}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
