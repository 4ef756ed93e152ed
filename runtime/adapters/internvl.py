"""InternVL: GotOcr2's dynamic tiling, rows x cols tiles of the tower's size
plus a thumbnail when split; <img> + image_seq_len context tokens per tile +
</img> in the text. Grid: (rows, cols), (1, 1) for one tile."""
from __future__ import annotations

from vlmedge.errors import UserInputError

from .. import image_budget
from .base import Adapter


class InternVL(Adapter):
    layout = "internvl"
    tilings = ("internvl",)

    def check_grid(self, grid) -> tuple[int, int]:
        try:
            rows, cols = (int(v) for v in grid)
        except (TypeError, ValueError):
            raise UserInputError("this model's prompt depends on the image's tile grid",
                                 expected="image_grid=(rows, cols) as preprocess() returns it",
                                 got=repr(grid)[:40]) from None
        if rows < 1 or cols < 1:
            raise UserInputError("bad image tile grid", expected="(rows, cols) both >= 1",
                                 got=repr(tuple(grid)))
        return rows, cols

    def probe_grid(self):
        return 1, 1

    def image_text(self, grid) -> str:
        """The text InternVLProcessor.replace_image_token puts for one image."""
        rows, cols = self.check_grid(grid)
        tiles = rows * cols + (1 if rows * cols > 1 else 0)
        im = self.image
        return im.image_start_token + im.image_token * (im.image_seq_len * tiles) + \
            im.image_end_token

    def budget(self, tiling, h, w, max_tokens):
        return image_budget.internvl_budget(tiling, self.image, h, w, max_tokens)
