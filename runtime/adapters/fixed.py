"""Fixed-size images: one resized (and maybe cropped) view, a fixed token count.

    repeat  <image> -> tokens_per_image copies of it (LLaVA, PaliGemma)
    wrap    <start_of_image> -> image_start_token + tokens_per_image image
            tokens + image_end_token, in the text (Gemma 3: "\\n\\n<start_of_image>"
            ... "<end_of_image>\\n\\n"); with pan-and-scan the whole image and
            each of its crops is one such block, in Gemma3Processor's sentence.
            Grid: the crop count, 0 (or None) for the whole image alone.
"""
from __future__ import annotations

from vlmedge.errors import UserInputError

from .base import Adapter

# Gemma3Processor.replace_image_token's text around the blocks of an image that
# pan-and-scan cropped (a test holds it to the processor's).
CROPS_INTRO = "Here is the original image {image} and here are some crops to help you see better "


class Repeat(Adapter):
    layout = "repeat"


class Wrap(Adapter):
    layout = "wrap"
    tilings = (None, "pan_and_scan")

    def check_grid(self, grid) -> int:
        if grid is None:
            return 0
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 0:
            raise UserInputError("bad image grid for this model",
                                 expected="the pan-and-scan crop count (an int >= 0) as "
                                          "preprocess() returns it, or None",
                                 got=repr(grid)[:40])
        return grid

    def probe_grid(self):
        return 0

    def image_token_count(self, grid) -> int:
        return self.image.tokens_per_image * (1 + self.check_grid(grid))

    def image_text(self, grid) -> str:
        im = self.image
        block = im.image_start_token + im.image_token * im.tokens_per_image + im.image_end_token
        crops = self.check_grid(grid)
        if crops == 0:
            return block
        return CROPS_INTRO.format(image=block) + " ".join([block] * crops)

    def budget(self, tiling, h, w, max_tokens):
        """Pan-and-scan: at most as many crops as fit beside the whole image
        (max_num_crops lowered; below 2 crops, none: one crop would be the
        whole image again, which the processor makes only when configured
        with max_num_crops 1). Without it, the one view must fit."""
        tiling = super().budget(tiling, h, w, max_tokens)
        if tiling is None or tiling["method"] != "pan_and_scan":
            return tiling
        fit = max_tokens // self.image.tokens_per_image - 1
        return {**tiling, "max_num_crops": min(tiling["max_num_crops"], fit if fit >= 2 else 0)}
