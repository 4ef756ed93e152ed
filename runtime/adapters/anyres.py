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
    tilings = ("anyres",)

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

    @property
    def _onevision(self) -> bool:  # the only anyres family with anyres_max_K
        return self.image.anyres_max_tiles is not None

    def several_tiling(self, tiling):
        """LLaVA-OneVision switches path for several images in one prompt
        (processor and model, batch_num_images > 1): each image padded square
        and resized to one tile, its features and one newline (grid (h, w, 0, 0))."""
        return {**tiling, "square": True} if self._onevision else tiling

    def check_grids(self, grids: list) -> None:
        if not self._onevision:
            return
        square = [tuple(self.check_grid(g)[2:]) == packing.SQUARE for g in grids]
        if len(grids) > 1 and not all(square) or len(grids) == 1 and square[0]:
            raise UserInputError(
                "LLaVA-OneVision encodes an image differently alone and beside other images",
                expected="images encoded for this prompt's image count",
                got=f"{sum(square)} of {len(grids)} encoded for several images",
                hint="pass the raw images (or encode them in the prompt they go to)")

    def budget(self, tiling, h, w, max_tokens):
        if tiling.get("square"):  # one tile and its newline, whatever the budget
            need = packing.image_token_count((h, w, *packing.SQUARE), self.image)
            if max_tokens < need:
                raise UserInputError(f"an image beside others takes {need} tokens with this "
                                     f"model", expected=f"max_image_tokens >= {need}",
                                     got=str(max_tokens))
            return tiling
        return image_budget.anyres_budget(tiling, self.image, h, w, max_tokens)

    def encode(self, run, input_names, pixels, grid, shapes):
        feats = super().encode(run, input_names, pixels, grid, shapes)
        return packing.pack_features(feats, self.check_grid(grid), self.image)
