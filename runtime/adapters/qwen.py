"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the image resized to multiples of
patch * merge pixels and flattened into patches; its (t, h, w) patch grid
gives the prompt's token count (t*h*w / merge^2), the vision graph's
host-computed inputs (patch coordinates; Qwen2.5-VL's windows; Qwen3-VL's
position-table taps) and the decoder's mrope positions (runtime/mrope.py)."""
from __future__ import annotations

import numpy as np

from vlmedge.errors import UserInputError

from .. import image_budget, mrope
from .base import Adapter


class Qwen(Adapter):
    layout = "qwen2_vl"
    tilings = ("qwen2_vl_patches",)

    def check_grid(self, grid) -> tuple[int, int, int]:
        if grid is None:
            raise UserInputError("this model's image token count depends on the image's patch "
                                 "grid, and none was given",
                                 expected="image_grid=(t, h, w) as the processor's image_grid_thw")
        return mrope.check_grid(grid, self.image.merge_size)

    def probe_grid(self):
        m = self.image.merge_size
        return 1, m, m

    def image_token_count(self, grid) -> int:
        return mrope.image_token_count(self.check_grid(grid), self.image.merge_size)

    def budget(self, tiling, h, w, max_tokens):
        return image_budget.qwen_budget(tiling, max_tokens)

    def encode(self, run, input_names, pixels, grid, shapes) -> np.ndarray:
        """One call over the image's patches, with its grid's host inputs."""
        feeds = {input_names[0]: pixels}
        feeds.update(mrope.vision_inputs(input_names[1:], grid, self.image, shapes))
        return run(feeds)

    def positions(self, decoder):
        return mrope.MropePositions(self.image.image_token_id, self.image.merge_size)
