"""Idefics3 / SmolVLM: the image resized to a long side, cut into rows x cols
tiles plus a global tile; each tile is image_seq_len tokens, written in the
text with the processor's row/column markers. Grid: (rows, cols), (0, 0)
for an image that was not split."""
from __future__ import annotations

from vlmedge.errors import UserInputError

from .. import image_budget
from .base import Adapter


class Idefics3(Adapter):
    layout = "idefics3"
    tilings = ("idefics3",)

    def check_grid(self, grid) -> tuple[int, int]:
        if grid is None:
            if self.image.do_image_splitting:
                raise UserInputError("this model's prompt depends on the image's tile grid, and "
                                     "none was given", expected="image_grid=(rows, cols)",
                                     hint="(0, 0) for an image that was not split")
            return 0, 0
        try:
            rows, cols = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise UserInputError("bad image tile grid", expected="(rows, cols)",
                                 got=repr(grid)) from None
        if rows < 0 or cols < 0 or (rows == 0) != (cols == 0):
            raise UserInputError("bad image tile grid",
                                 expected="(rows, cols) both >= 1, or (0, 0) for no split",
                                 got=repr(tuple(grid)))
        return rows, cols

    def probe_grid(self):
        return 1, 1

    def image_text(self, grid) -> str:
        """The text Idefics3Processor.replace_image_token puts for one image."""
        im = self.image
        fake, glob = im.fake_image_token, im.global_image_token
        tokens = im.image_token * im.image_seq_len
        global_image = fake + glob + tokens + fake
        rows, cols = self.check_grid(grid)
        if rows == 0 and cols == 0:
            return global_image
        text = ""
        for r in range(rows):
            for c in range(cols):
                text += fake + im.tile_token.format(row=r + 1, col=c + 1) + tokens
            text += "\n"
        return text + "\n" + global_image

    def budget(self, tiling, h, w, max_tokens):
        return image_budget.idefics3_budget(tiling, self.image, h, w, max_tokens)
