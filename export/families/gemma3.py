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
- Preprocessing is a plain resize to the tower's size (bilinear), no crop;
  pan-and-scan (off by default) is refused at export.
"""
from __future__ import annotations

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

    def preprocess_config(self, processor) -> dict[str, Any]:
        ip = processor.image_processor
        if getattr(ip, "do_pan_and_scan", None):
            raise ModelDirError("Gemma 3's pan-and-scan crops are not supported",
                                expected="do_pan_and_scan false in preprocessor_config.json "
                                         "(the default)", got="true",
                                hint="set do_pan_and_scan to false: each image is then one "
                                     "resized view, as Gemma 3 runs by default")
        return super().preprocess_config(processor)

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
