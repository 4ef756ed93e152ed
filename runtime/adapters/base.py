"""The adapter interface and the behaviour most layouts share."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from vlmedge.errors import UserInputError

from .. import mrope

MAX_IMAGES = 16  # images per prompt: far above what an edge context holds


class Adapter:
    """The run-time half of a family (see the package docstring).

    image: the manifest's ImageFacts. Subclasses set `layout` (the manifest's
    image.expand) and `tilings` (the preprocess tiling methods it takes, None
    for one resized view) and override what differs."""

    layout = ""
    tilings: tuple[str | None, ...] = (None,)

    def __init__(self, image):
        self.image = image

    # -- the image grid --------------------------------------------------------
    def check_grid(self, grid) -> Any:
        """The grid as this layout's typed value; one UserInputError if bad."""
        return grid

    def probe_grid(self) -> Any:
        """A small valid grid: the chat template is probed with it at load."""
        return None

    # -- the prompt ------------------------------------------------------------
    def image_token_count(self, grid) -> int:
        """Copies of the image token one image of `grid` takes."""
        return self.image.tokens_per_image

    def image_text(self, grid) -> str | None:
        """The text an image placeholder becomes, expanded before tokenizing
        (merges come out as the processor's); None: the placeholder token is
        repeated image_token_count times after tokenizing."""
        return None

    def several_tiling(self, tiling: dict | None) -> dict | None:
        """The tiling of an image that shares its prompt with others (the same,
        but for LLaVA-OneVision)."""
        return tiling

    def check_grids(self, grids: list) -> None:
        """Grids that cannot go together in one prompt, refused in one line."""

    def check_image_count(self, n: int) -> None:
        """Refuse, in one line, more images in one prompt than the runtime takes
        (every layout packs several, each its processor's way)."""
        if n > MAX_IMAGES:  # each would be preprocessed before the context check
            raise UserInputError("too many images in one prompt", expected=f"<= {MAX_IMAGES}",
                                 got=str(n), hint="ask about fewer images at a time")

    # -- the image-token budget --------------------------------------------------
    def budget(self, tiling: dict | None, h: int, w: int, max_tokens: int) -> dict | None:
        """The tiling for an h x w image within max_tokens image tokens (a fixed-
        size image: its own, if it fits)."""
        if max_tokens < self.image.tokens_per_image:
            raise UserInputError(f"this model's image always takes "
                                 f"{self.image.tokens_per_image} tokens",
                                 expected=f"max_image_tokens >= {self.image.tokens_per_image}",
                                 got=str(max_tokens))
        return tiling

    # -- the vision graph ----------------------------------------------------------
    def encode(self, run: Callable[[dict], np.ndarray], input_names: list[str],
               pixels: np.ndarray, grid, shapes: dict) -> np.ndarray:
        """The vision graph over one image's pixels -> the prompt's image features
        (N, T, D). `run` runs one vision call on its feeds; input_names are the
        graph's (pixel input first); shapes its input shapes.

        Tiles (N, 3, S, S) go one at a time: a 640x480 frame is 13 SmolVLM
        tiles, and one batch of 13 peaked at 4.7 GB in onnxruntime against
        0.9 GB tile by tile, which was also ~20% faster on this CPU (measured)."""
        name = input_names[0]
        if pixels.ndim == 4 and pixels.shape[0] > 1:
            return np.concatenate([run({name: t[None]}) for t in pixels])
        return run({name: pixels})

    # -- the decoder -----------------------------------------------------------------
    def positions(self, decoder) -> Callable:
        """The decoder's position strategy (runtime/mrope.py)."""
        return mrope.LinearPositions()
