"""SmolVLM / SmolVLM2 (SmolVLMForConditionalGeneration, model_type
"smolvlm"): Idefics3's model under another name.

transformers builds SmolVLM from Idefics3's parts (models/smolvlm/
modular_smolvlm.py): the same SigLIP tower, pixel-shuffle connector and
Llama decoder at model.model.vision_model / connector / text_model, the same
image processor (tiles of max_image_size plus a global tile, Lanczos), and
the same prompt expansion (<fake_token_around_image><row_r_col_c> +
image_seq_len <image> per tile, then the global tile). So the graphs, the
manifest's tiling ("idefics3") and image expansion ("idefics3") are the
idefics3 family's, and the runtime needs nothing new.

What differs is the processor. SmolVLMProcessor takes a video processor
(transformers' video processors need torchvision) and refuses to build
without num2words, which only spells out video frame counts. Images need
neither, so the family builds an image-only SmolVLMProcessor: the same
class, the same image token layout, without them.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

from .idefics3 import Idefics3


@contextlib.contextmanager
def _num2words_not_needed():
    """SmolVLMProcessor.__init__ raises ImportError when num2words is missing;
    it is used only to write video prompts ("a series of twelve frames"),
    which an image-only processor never writes. Lets __init__ through, then
    puts the module as it was."""
    from transformers.models.smolvlm import processing_smolvlm as module

    if getattr(module, "num2words", True) is not None:  # installed, or the check moved
        yield
        return
    module.num2words = _no_video
    try:
        yield
    finally:
        module.num2words = None


def _no_video(*args, **kwargs):
    raise RuntimeError("video prompts need num2words (pip install num2words)")


@lru_cache(maxsize=1)
def image_only_processor():
    """SmolVLMProcessor without a video processor (and without num2words).

    ProcessorMixin finds a processor's parts from its __init__ signature
    (get_attributes), so this one's (image_processor, tokenizer) makes
    from_pretrained load those two and nothing for video."""
    from transformers import SmolVLMProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlySmolVLMProcessor(SmolVLMProcessor):
        def __init__(self, image_processor, tokenizer, image_seq_len: int = 169,
                     chat_template: str | None = None, **kwargs):
            # The None video processor is dropped: ProcessorMixin zips its
            # arguments with get_attributes(), which has two entries.
            with _num2words_not_needed():
                super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len,
                                 chat_template=chat_template, **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            # SmolVLMProcessor's own adds video sampling defaults read from its
            # video processor, which this one has not; an image prompt needs none.
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template,
                                                      **kwargs)

        @property
        def global_image_tag(self) -> str:
            """Idefics3Processor's name for the global tile's token, as the
            idefics3 family's image_facts reads it."""
            return self.global_image_token

    ImageOnlySmolVLMProcessor.__name__ = SmolVLMProcessor.__name__
    return ImageOnlySmolVLMProcessor


class SmolVLM(Idefics3):
    name = "smolvlm"
    architectures = ("SmolVLMForConditionalGeneration",)
    model_types = ("smolvlm",)

    def load_processor(self, path, trust_remote_code: bool = False):
        return image_only_processor().from_pretrained(path, trust_remote_code=trust_remote_code)
