"""PaliGemma and PaliGemma 2 (PaliGemmaForConditionalGeneration): SigLIP tower,
a linear projection, Gemma (PaliGemma) or Gemma 2 (PaliGemma 2) decoder.

What differs, and where it is handled:

- A prefix-LM: the whole prompt (image tokens, <bos>, the text, "\\n")
  attends both ways in the prefill; generated tokens attend causally. The
  decoder graph takes attention_groups under the "prompt" rule
  (base.GroupedDecoderWrapper); the runtime then never splits a prompt's
  prefill at a cached prefix (a prefix's keys depend on every later prompt
  token). Gemma 2's sliding window and logit soft-capping are in the graph.
- Positions count from 1 (transformers adds 1): the graph adds it.
- No chat template: PaliGemmaProcessor writes "<image>" x image_seq_length +
  <bos> + prompt + "\\n". The family gives the processor a template that
  renders exactly that, which the manifest carries like any model's.
- Preprocessing: SigLIP's plain resize (bicubic) to the tower's size.
"""
from __future__ import annotations

from typing import Any

from vlmedge.errors import UnsupportedArchitectureError

from .base import FixedSizeImages

# PaliGemmaProcessor's prompt for the last (user) message: its parts in order,
# images as "<image>" (expanded to image_seq_length copies by the runtime),
# <bos> right after the last image (first, when there is none), then "\n".
TEMPLATE = (
    "{% set parts = messages[-1]['content'] %}"
    "{% if parts is string %}{{ bos_token + parts }}{% else %}"
    "{% set ns = namespace(last=-1) %}"
    "{% for item in parts %}{% if item['type'] == 'image' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% if ns.last < 0 %}{{ bos_token }}{% endif %}"
    "{% for item in parts %}{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% if loop.index0 == ns.last %}{{ bos_token }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\n' }}")
TEXT_MODELS = ("gemma", "gemma2")


class PaliGemma(FixedSizeImages):
    name = "paligemma"
    architectures = ("PaliGemmaForConditionalGeneration",)
    model_types = ("paligemma",)
    attention_groups = "prompt"
    first_position = 1
    generated_token_type = 1  # the suffix
    window_limits_groups = False  # transformers ORs the prefix block into the window mask

    def check_config(self, config) -> None:
        text = getattr(getattr(config, "text_config", None), "model_type", None)
        if text not in TEXT_MODELS:
            raise UnsupportedArchitectureError(
                "unsupported language model for the paligemma family",
                expected=f"a text_config of model_type {' or '.join(TEXT_MODELS)}",
                got=repr(text), hint="see README 'Supported models'")

    def load_processor(self, path, trust_remote_code: bool = False):
        processor = super().load_processor(path, trust_remote_code)
        if not getattr(processor, "chat_template", None):
            processor.chat_template = TEMPLATE
        return processor

    def hf_inputs(self, processor, image, question: str) -> dict:
        """PaliGemmaProcessor's own prompt: "<image>" + question, to which it
        adds <bos> after the image tokens and a newline."""
        out = dict(processor(images=image, text="<image>" + question, return_tensors="pt"))
        out.pop("labels", None)  # training targets (all ignored for a prompt alone)
        return out

    def image_facts(self, model, processor) -> dict[str, Any]:
        feats = self.sample_features(model, processor)
        token = processor.image_token
        return {"image_token": token,
                "image_token_id": int(model.config.image_token_id),
                "tokens_per_image": int(feats.shape[1]),
                "feature_dim": int(feats.shape[2]),
                "image_placeholder": token,
                "expand": "repeat"}  # <image> -> tokens_per_image copies of it
