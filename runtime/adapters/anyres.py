"""LLaVA-NeXT / LLaVA-OneVision "anyres": a base tile and the tiles of the best
grid pinpoint; the per-tile features are packed on the host by the image's
original size (runtime/anyres.py). Grid: (h, w, bh, bw)."""
from __future__ import annotations

from vlmedge.errors import UserInputError

from .. import anyres as packing
from .. import image_budget
from .base import Adapter


class AnyRes(Adapter):
    layout = "anyres"
    tiling = "anyres"

    def check_grid(self, grid):
        if grid is None:
            raise UserInputError("this model's image token count depends on the image's size, "
                                 "and none was given",
                                 expected="image_grid=(h, w, bh, bw) as preprocess() returns it")
        return packing.check_grid(grid, self.image)

    def probe_grid(self):
        bh, bw = self.image.grid_pinpoints[0]
        return bh, bw, bh, bw

    def image_token_count(self, grid) -> int:
        return packing.image_token_count(self.check_grid(grid), self.image)

    def check_image_count(self, n: int) -> None:
        if n > 1 and self.image.anyres_max_tiles is not None:
            # LLaVA-OneVision (the only anyres family with anyres_max_K) switches to
            # a different path for several images in one prompt (processor and
            # model, batch_num_images > 1): each image padded square, base tile
            # only, one newline; the runtime does not implement that path.
            raise UserInputError("this model (LLaVA-OneVision) takes one image per prompt in "
                                 "vlmedge", got=f"{n} images",
                                 hint="ask about each image in its own prompt")

    def budget(self, tiling, h, w, max_tokens):
        return image_budget.anyres_budget(tiling, self.image, h, w, max_tokens)

    def encode(self, run, input_names, pixels, grid, shapes):
        feats = super().encode(run, input_names, pixels, grid, shapes)
        return packing.pack_features(feats, self.check_grid(grid), self.image)
