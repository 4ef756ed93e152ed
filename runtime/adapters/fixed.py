"""Fixed-size images: one resized (and maybe cropped) view, a fixed token count.

    repeat  <image> -> tokens_per_image copies of it (LLaVA, PaliGemma)
    wrap    <start_of_image> -> image_start_token + tokens_per_image image
            tokens + image_end_token, in the text (Gemma 3: "\\n\\n<start_of_image>"
            ... "<end_of_image>\\n\\n")
"""
from __future__ import annotations

from .base import Adapter


class Repeat(Adapter):
    layout = "repeat"


class Wrap(Adapter):
    layout = "wrap"

    def image_text(self, grid) -> str:
        im = self.image
        return im.image_start_token + im.image_token * im.tokens_per_image + im.image_end_token
