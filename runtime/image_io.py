"""Image loading for the runtime: any common source -> uint8 (H, W, 3) RGB.

Decoding stays with Pillow. Mode conversion follows Hugging Face's
`transformers.image_transforms.convert_to_rgb` (transformers 5.x), so that the
pixels handed to the resize equal those the HF image processor resizes:

- an image with an alpha band ("A" in getbands(): RGBA, LA, PA) or a
  `transparency` entry in .info (P or L with a transparent index, RGB with a
  transparent colour) is converted to RGBA and alpha-composited over WHITE;
- every other mode goes through Pillow's .convert("RGB"). Note that Pillow
  CLIPS 16-bit images ("I;16", "I") to 0..255 on that conversion rather than
  scaling them, so a full-range 16-bit PNG comes out mostly white. HF does the
  same; we keep it for parity.

EXIF orientation is applied first (ImageOps.exif_transpose), as HF's
`load_image` does. Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
stays on: an image over it is refused with a ValueError.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlmedge.errors import UserInputError

LAYOUTS = ("RGB", "BGR")

# What Pillow raises on a file it cannot decode: truncated data (OSError),
# an unknown format (UnidentifiedImageError is an OSError), and a few plugins'
# parse errors (SyntaxError, struct.error, EOFError, ValueError).
_DECODE_ERRORS = (OSError, SyntaxError, struct.error, EOFError, ValueError)


def load_image(src, layout: str = "RGB", *, composite_alpha: bool = True) -> np.ndarray:
    """Any image source -> uint8 (H, W, 3) RGB pixels, C-contiguous (HWC).

    src: a path (str or os.PathLike), encoded bytes (bytes, bytearray,
    memoryview), a PIL image, or a uint8 numpy array (H, W, 3) whose channel
    order is `layout` ("RGB", or "BGR" for OpenCV camera frames). `layout` only
    applies to arrays: decoded files and PIL images have a known order.
    A C-contiguous RGB array is returned as is (no copy); a decoded image's
    array may be read-only (it shares Pillow's buffer copy).

    composite_alpha=True converts modes as HF's convert_to_rgb (transparency
    over white, the processors' do_convert_rgb=True); False uses Pillow's plain
    .convert("RGB"), which drops alpha (what HF's load_image does).

    Raises ValueError (vlmedge.errors.UserInputError) for a missing or
    undecodable file, an image over Pillow's decompression-bomb limit, an empty
    image, or an array of the wrong dtype or shape.
    """
    if layout not in LAYOUTS:
        raise UserInputError("load_image: unknown channel layout",
                             expected=" or ".join(map(repr, LAYOUTS)), got=repr(layout))
    if isinstance(src, np.ndarray):
        return _from_array(src, layout)
    if isinstance(src, Image.Image):
        return _pil_to_rgb_array(src, composite_alpha)
    if isinstance(src, (str, os.PathLike)):
        fp, what = _open_path(Path(src)), f"image file {os.fspath(src)!r}"
    elif isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise UserInputError("load_image: empty bytes", expected="an encoded image",
                                 got="0 bytes")
        fp, what = io.BytesIO(bytes(src)), f"image data ({len(src)} bytes)"
    else:
        raise UserInputError(
            "load_image: unsupported image source",
            expected="a path, encoded bytes, a PIL image or a uint8 (H, W, 3) numpy array",
            got=type(src).__name__)
    with _decode(fp, what) as image:  # closes the file (multi-frame files keep it open)
        return _pil_to_rgb_array(image, composite_alpha)


def convert_to_rgb(image: Image.Image) -> Image.Image:
    """PIL image of any mode -> mode "RGB", as HF's convert_to_rgb does it
    (alpha composited over white; other modes via Pillow's convert)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_array(arr: np.ndarray, layout: str) -> np.ndarray:
    """uint8 (H, W, 3) in `layout` order -> C-contiguous RGB (H, W, 3)."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise UserInputError(
            "load_image: bad pixel array", expected=f"uint8 (H, W, 3) {layout}",
            got=f"{arr.dtype} {arr.shape}",
            hint="convert grayscale/RGBA arrays with PIL or np.stack first")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UserInputError("load_image: empty image", expected="height and width >= 1",
                             got=f"{arr.shape[0]}x{arr.shape[1]} (HxW)")
    if layout == "BGR":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


def _open_path(path: Path):
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise UserInputError(f"load_image: image file {what}", expected="an image file",
                             got=str(path))
    return path


def _decode(fp, what: str) -> Image.Image:
    """Open and fully decode `fp` with Pillow, mapping its errors to ValueError."""
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make the
        # warning an error so every bomb is refused the same way. (The filter
        # change is process-wide for the duration of the open, as any
        # catch_warnings; it only affects this one warning category.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise UserInputError(
            f"load_image: {what} is too large to decode safely",
            expected=f"at most Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} pixels",
            got=str(e).split(",")[0],
            hint="raise PIL.Image.MAX_IMAGE_PIXELS if the source is trusted") from None
    except UnidentifiedImageError:
        raise UserInputError(f"load_image: {what} is not a recognised image",
                             expected="JPEG, PNG, WebP, BMP, TIFF, ...",
                             got="unidentified data") from None
    except _DECODE_ERRORS as e:
        raise UserInputError(f"load_image: {what} cannot be decoded",
                             expected="a complete image file",
                             got=f"{type(e).__name__}: {e}") from None
    return image


def _pil_to_rgb_array(image: Image.Image, composite_alpha: bool) -> np.ndarray:
    """PIL image -> EXIF-upright RGB uint8 (H, W, 3), C-contiguous."""
    if image.width == 0 or image.height == 0:
        raise UserInputError("load_image: empty image", expected="width and height >= 1",
                             got=f"{image.width}x{image.height} (WxH)")
    try:
        image = ImageOps.exif_transpose(image)
        if composite_alpha:
            image = convert_to_rgb(image)
        elif image.mode != "RGB":
            image = image.convert("RGB")
    except _DECODE_ERRORS as e:  # e.g. a corrupt EXIF block or an unconvertible mode
        raise UserInputError("load_image: cannot convert image to RGB",
                             expected="a mode Pillow converts to RGB",
                             got=f"mode {image.mode!r}: {type(e).__name__}: {e}") from None
    return np.ascontiguousarray(np.asarray(image))  # (H, W, 3) uint8, read-only view
