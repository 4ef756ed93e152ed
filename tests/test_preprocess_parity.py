"""The runtime's image preprocessing equals the Hugging Face image processor.

HF's CLIPImageProcessor falls back to its Pillow backend here (torchvision is
absent); that is the reference. Requirement: at most one uint8 step before
normalization; measured: 0 (bit-identical pixel_values) on every case below.
"""
import io

import numpy as np
import pytest
from PIL import Image

from vlmedge.runtime import preprocess
from vlmedge.runtime.image_io import load_image
from vlmedge.runtime.preprocess import ImagePreprocessor, config_from_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # the "falling back to the Pil backend" notice

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _hf_clip(short: int):
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": short}, crop_size={"height": short, "width": short},
        resample=3, do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)


@pytest.fixture(scope="module")
def demo_hf():
    """The demo model's processor: shortest edge 128, crop 128, bicubic."""
    return _hf_clip(128)


@pytest.fixture(scope="module")
def llava_hf():
    """LLaVA-1.5-like: shortest edge 336, crop 336."""
    return _hf_clip(336)


def _rng_image(h, w, seed=0):
    """Smooth gradients plus noise: realistic enough to exercise the filter's
    negative lobes and the clamping at 0 and 255."""
    rng = np.random.default_rng(seed + h + 3 * w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / max(w - 1, 1), yy / max(h - 1, 1), ((xx + yy) % 17) / 16], -1) * 255
    return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _mode_image(mode: str) -> Image.Image:
    rgb = Image.fromarray(_rng_image(90, 120, seed=5))
    if mode == "RGBA":  # real transparency: a gradient alpha with fully clear corners
        alpha = np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (90, 1))
        alpha[:10, :10] = 0
        return Image.merge("RGBA", (*rgb.split(), Image.fromarray(alpha)))
    if mode == "LA":
        return _mode_image("RGBA").convert("LA")
    if mode == "P":
        return rgb.quantize(64)
    if mode == "P+transparency":
        p = rgb.quantize(64)
        p.info["transparency"] = 3
        return p
    if mode == "I;16":  # a 16-bit PNG round trip, values over 255 included
        arr = (np.asarray(rgb.convert("L")).astype(np.uint16) * 3).astype(np.uint16)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        im = Image.open(io.BytesIO(buf.getvalue()))
        assert im.mode == "I;16"
        return im
    return rgb.convert(mode)  # L, CMYK, 1


def _exif_rotated_jpeg(tmp_path):
    """A landscape JPEG whose EXIF orientation 6 says: rotate 90 degrees."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_rng_image(60, 100, seed=9)).save(path, "JPEG", exif=exif, quality=95)
    return path


def _max_step(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest difference in uint8 steps, undoing the normalization."""
    std = np.asarray(CLIP_STD, np.float64)[None, :, None, None]
    return float((np.abs(ours.astype(np.float64) - theirs) * std * 255).max())


def _assert_parity(ours: np.ndarray, theirs: np.ndarray):
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    std = np.asarray(CLIP_STD, np.float32)[None, :, None, None]
    tol = 1 / 255 / std + 1e-5  # one uint8 step after normalization
    diff = np.abs(ours - theirs)
    assert (diff <= tol).all(), f"max difference {_max_step(ours, theirs):.2f} uint8 steps"
    # and what we actually get: the same numbers
    np.testing.assert_array_equal(ours, theirs)


ARRAY_SIZES = [(1, 1), (7, 5), (128, 128), (480, 640), (1080, 1920), (2160, 3840)]


@pytest.mark.parametrize("h,w", ARRAY_SIZES)
@pytest.mark.parametrize("which", ["demo_hf", "llava_hf"])
def test_arrays_match_hf(h, w, which, request):
    hf = request.getfixturevalue(which)
    img = _rng_image(h, w)
    ours = ImagePreprocessor.from_hf_processor_config(hf.to_dict())(img)
    _assert_parity(ours, hf(Image.fromarray(img), return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("h,w", [(3, 4000), (4000, 3)])
def test_extreme_aspect_matches_hf(h, w, demo_hf):
    """HF resizes the whole 128 x 170666 image before cropping (65 MB); we
    compute the crop only. (336 would make HF allocate 450 MB: not tested.)"""
    img = _rng_image(h, w)
    ours = ImagePreprocessor.from_hf_processor_config(demo_hf.to_dict())(img)
    _assert_parity(ours, demo_hf(Image.fromarray(img), return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "P+transparency", "CMYK", "1", "I;16"])
def test_pil_modes_match_hf(mode, demo_hf):
    im = _mode_image(mode)
    ours = ImagePreprocessor.from_hf_processor_config(demo_hf.to_dict())(im)
    _assert_parity(ours, demo_hf(im, return_tensors="np")["pixel_values"])


def test_pil_mode_conversion_equals_hf_convert_to_rgb():
    from transformers.image_transforms import convert_to_rgb
    for mode in ["L", "RGBA", "LA", "P", "P+transparency", "CMYK", "1", "I;16"]:
        im = _mode_image(mode)
        np.testing.assert_array_equal(load_image(im), convert_to_rgb(im, return_numpy=True),
                                      err_msg=mode)
    # transparency goes over white, as HF does
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert (load_image(clear) == 255).all()
    assert (load_image(clear, composite_alpha=False) == (10, 20, 30)).all()


def test_16bit_png_is_clipped_like_hf():
    """Pillow clips I;16 to 0..255 on convert('RGB') (no rescale); so does HF."""
    im = _mode_image("I;16")
    arr16 = np.asarray(im)
    got = load_image(im)[..., 0]
    np.testing.assert_array_equal(got, np.minimum(arr16, 255).astype(np.uint8))


def test_exif_rotated_jpeg_matches_hf(tmp_path, demo_hf):
    path = _exif_rotated_jpeg(tmp_path)
    rgb = load_image(path)
    assert rgb.shape == (100, 60, 3)  # upright: the 100x60 landscape is now portrait
    hf_image = transformers.image_utils.load_image(str(path))  # applies EXIF, as we do
    ours = ImagePreprocessor.from_hf_processor_config(demo_hf.to_dict())(path)
    _assert_parity(ours, demo_hf(hf_image, return_tensors="np")["pixel_values"])
    # a path, its bytes and the opened PIL image give the same pixels
    np.testing.assert_array_equal(load_image(path.read_bytes()), rgb)
    np.testing.assert_array_equal(load_image(Image.open(path)), rgb)


def test_bgr_camera_frames():
    rgb = _rng_image(20, 30)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    np.testing.assert_array_equal(load_image(bgr, layout="BGR"), rgb)
    pp = ImagePreprocessor({"size": 16, "crop": [16, 16], "mean": CLIP_MEAN, "std": CLIP_STD})
    np.testing.assert_array_equal(pp(rgb).copy(), pp(bgr, layout="BGR"))


# --- HF's size and crop arithmetic ---------------------------------------------

def test_shortest_edge_size_equals_hf():
    from transformers.image_transforms import (get_resize_output_image_size,
                                               get_size_with_aspect_ratio)
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 4000), (4000, 1), (3, 4000), (1080, 1920), (1920, 1080), (333, 777)]
    shapes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for h, w in shapes:
        for size in (128, 224, 336, 384):
            want = get_resize_output_image_size(np.zeros((h, w, 3)), size, default_to_square=False,
                                                input_data_format="channels_last")
            assert preprocess.shortest_edge_size(h, w, size) == tuple(want), (h, w, size)
            want = get_size_with_aspect_ratio((h, w), size, 1333)
            assert preprocess.shortest_edge_size(h, w, size, 1333) == tuple(want), (h, w, size)


@pytest.mark.parametrize("h,w", [(10, 10), (11, 10), (10, 13), (5, 20), (3, 3), (1, 8), (9, 4)])
@pytest.mark.parametrize("crop", [(4, 4), (5, 6), (10, 10), (12, 9), (15, 15)])
def test_center_crop_equals_hf(h, w, crop):
    """Odd margins and crops larger than the image (zero padding)."""
    from transformers.image_transforms import center_crop
    img = _rng_image(h, w)
    want = center_crop(img, crop, input_data_format="channels_last")
    np.testing.assert_array_equal(preprocess.center_crop(img, *crop), want)


def test_padded_crop_pipeline_matches_hf():
    """Crop larger than the resized image: HF pads with zeros, then normalizes."""
    hf = transformers.CLIPImageProcessor(size={"height": 20, "width": 30},
                                         crop_size={"height": 25, "width": 27}, resample=2)
    img = _rng_image(50, 40)
    ours = ImagePreprocessor.from_hf_processor_config(hf.to_dict())(img)
    theirs = hf(Image.fromarray(img), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("kwargs", [
    dict(do_rescale=False), dict(do_normalize=False), dict(do_center_crop=False),
    dict(do_resize=False, crop_size={"height": 64, "width": 64}),
    dict(size={"shortest_edge": 100, "longest_edge": 150}, do_center_crop=False),
    dict(resample=1), dict(resample=4), dict(resample=5), dict(image_mean=0.5, image_std=0.5),
])
def test_processor_options_match_hf(kwargs):
    base = dict(size={"shortest_edge": 96}, crop_size={"height": 80, "width": 80}, resample=2)
    hf = transformers.CLIPImageProcessor(**{**base, **kwargs})
    img = _rng_image(123, 211)
    ours = ImagePreprocessor.from_hf_processor_config(hf.to_dict())(img)
    theirs = hf(Image.fromarray(img), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(ours, theirs.astype(np.float32))


# --- config --------------------------------------------------------------------

def test_config_from_hf_reads_processor_config_json(demo_hf):
    cfg = config_from_hf({"image_processor": demo_hf.to_dict(), "processor_class": "X"})
    assert cfg == {"resample": "bicubic", "resize": "shortest_edge", "size": 128,
                   "max_size": None, "crop": [128, 128], "rescale": 1 / 255,
                   "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "convert_rgb": True,
                   "processor": "CLIPImageProcessor"}
    assert ImagePreprocessor(cfg).config == ImagePreprocessor(dict(cfg)).config


@pytest.mark.parametrize("bad,match", [
    ({"do_image_splitting": True}, "do_image_splitting"),
    ({"size": {"longest_edge": 364}}, "unsupported size"),
    ({"size": {"shortest_edge": 8}, "resample": 0}, "resample"),
])
def test_config_from_hf_refuses_what_it_cannot_do(bad, match):
    with pytest.raises(ValueError, match=match):
        ImagePreprocessor.from_hf_processor_config(bad)


@pytest.mark.parametrize("bad,match", [
    ({"colour": 1}, "unknown config keys"), ({"resize": "longest"}, "resize rule"),
    ({"tiling": {"max_image_size": 364}}, "tiling"),
    ({"size": 0}, "shortest_edge"), ({"crop": [0, 3]}, "crop"),
    ({"mean": [0.5, 0.5]}, "3 values"), ({"mean": [0] * 3, "std": [1, 0, 1]}, "non-zero"),
])
def test_bad_config_is_a_clear_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        ImagePreprocessor(bad)


def test_output_buffer_is_reused_for_repeating_shapes():
    pp = ImagePreprocessor({"size": 32, "crop": [32, 32], "mean": CLIP_MEAN, "std": CLIP_STD})
    a, b = _rng_image(48, 64, 1), _rng_image(48, 64, 2)
    first = pp(a)
    kept = first.copy()
    assert pp(b) is first  # same shape: same buffer, no allocation
    assert not np.array_equal(first, kept)
    assert ImagePreprocessor(pp.config)(a).shape == (1, 3, 32, 32)


# --- bad input -----------------------------------------------------------------

@pytest.mark.parametrize("src,match", [
    (np.zeros((0, 0, 3), np.uint8), "empty image"),
    (np.zeros((4, 4), np.uint8), "bad pixel array"),
    (np.zeros((4, 4, 3), np.float32), "bad pixel array"),
    (np.zeros((4, 4, 4), np.uint8), "bad pixel array"),
    (b"", "empty bytes"),
    (b"not an image at all", "not a recognised image"),
    ("/nonexistent/photo.jpg", "not found"),
    (12345, "unsupported image source"),
    (Image.new("RGB", (0, 0)), "empty image"),
])
def test_bad_images_are_one_line_value_errors(src, match):
    pp = ImagePreprocessor({"size": 8})
    with pytest.raises(ValueError, match=match) as e:
        pp(src)
    assert "\n" not in str(e.value)


def test_truncated_and_directory_inputs(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rng_image(64, 64)).save(buf, "PNG")
    with pytest.raises(ValueError, match="cannot be decoded"):
        load_image(buf.getvalue()[:200])
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="layout"):
        load_image(_rng_image(4, 4), layout="RGBA")


def test_decompression_bomb_is_refused(monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    for limit in (3000, 1000):  # over the limit (Pillow warns) and over twice it (Pillow errors)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ValueError, match="too large"):
            load_image(buf.getvalue())
    assert Image.MAX_IMAGE_PIXELS is not None


def test_non_contiguous_arrays_are_accepted():
    img = _rng_image(40, 80)
    pp = ImagePreprocessor({"size": 16, "crop": [16, 16]})
    np.testing.assert_array_equal(pp(img[:, ::2]).copy(), pp(np.ascontiguousarray(img[:, ::2])))


def test_runtime_import_pulls_no_torch_or_transformers():
    import subprocess
    import sys
    code = ("import sys, numpy as np; from vlmedge.runtime.preprocess import ImagePreprocessor;"
            "ImagePreprocessor({'size': 8})(np.zeros((9, 9, 3), np.uint8));"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_manifest_preprocess_dict_as_the_exporter_writes_it(llava_hf):
    """The shape export/families writes into manifest["preprocess"]."""
    manifest_entry = {"processor": "CLIPImageProcessor", "resize": "shortest_edge", "size": 336,
                      "crop": [336, 336], "resample": "bicubic", "rescale": 1 / 255,
                      "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "convert_rgb": True,
                      "tiling": None}
    img = _rng_image(300, 500)
    ours = ImagePreprocessor(manifest_entry)(img)
    np.testing.assert_array_equal(
        ours, llava_hf(Image.fromarray(img), return_tensors="np")["pixel_values"])


# --- families with their own layout: Idefics3 tiles, Qwen2-VL patches ---------

@pytest.mark.parametrize("h,w", [(300, 200), (480, 640), (1080, 1920), (50, 1200)])
def test_idefics3_tiles_match_hf(h, w):
    hf = transformers.Idefics3ImageProcessor()  # longest_edge 1456, tiles 364, lanczos
    img = _rng_image(h, w)
    want = hf(Image.fromarray(img), return_tensors="np", return_row_col_info=True)
    frames, rows, cols = preprocess.idefics3_frames(
        img, hf.size["longest_edge"], hf.max_image_size["longest_edge"], hf.resample)
    ours = preprocess.frames_to_pixel_values(frames, hf.rescale_factor, hf.image_mean,
                                             hf.image_std)
    assert (rows, cols) == (want["rows"][0][0], want["cols"][0][0])
    np.testing.assert_array_equal(ours, want["pixel_values"])


def test_idefics3_without_splitting_matches_hf():
    hf = transformers.Idefics3ImageProcessor(do_image_splitting=False)
    img = _rng_image(333, 500)
    frames, rows, cols = preprocess.idefics3_frames(img, splitting=False)
    assert frames.shape == (1, 364, 364, 3) and (rows, cols) == (0, 0)
    np.testing.assert_array_equal(
        preprocess.frames_to_pixel_values(frames, 1 / 255, hf.image_mean, hf.image_std),
        hf(Image.fromarray(img), return_tensors="np")["pixel_values"])


def test_idefics3_without_first_resize_matches_hf():
    """do_resize=False (manifest tiling longest_edge None): tiles cut from the
    image resized only up to multiples of the tile."""
    hf = transformers.Idefics3ImageProcessor(do_resize=False, max_image_size={"longest_edge": 64})
    img = _rng_image(90, 150)
    want = hf(Image.fromarray(img), return_tensors="np", return_row_col_info=True)
    frames, rows, cols = preprocess.idefics3_frames(img, None, 64, hf.resample)
    assert (rows, cols) == (want["rows"][0][0], want["cols"][0][0]) == (2, 3)
    np.testing.assert_array_equal(
        preprocess.frames_to_pixel_values(frames, hf.rescale_factor, hf.image_mean, hf.image_std),
        want["pixel_values"])


@pytest.mark.parametrize("h,w", [(30, 40), (480, 640), (1080, 1920), (700, 33)])
def test_qwen2_vl_patches_match_hf(h, w):
    hf = transformers.Qwen2VLImageProcessor()
    img = _rng_image(h, w)
    want = hf(Image.fromarray(img), return_tensors="np")
    patches, grid = preprocess.qwen2_vl_patches(
        img, hf.rescale_factor, hf.image_mean, hf.image_std,
        min_pixels=hf.size["shortest_edge"], max_pixels=hf.size["longest_edge"])
    np.testing.assert_array_equal(grid, want["image_grid_thw"])
    np.testing.assert_array_equal(patches, want["pixel_values"])


def test_smart_resize_equals_hf():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    rng = np.random.default_rng(3)
    for h, w in [(28, 28), (1, 150), (4000, 3000)] + \
            [tuple(int(v) for v in rng.integers(10, 5000, 2)) for _ in range(300)]:
        if max(h, w) / min(h, w) > 200:
            continue
        assert preprocess.smart_resize(h, w) == smart_resize(h, w), (h, w)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess.smart_resize(1, 300)


# --- every C kernel the CPU has (portable, avx2, avx512vnni) against HF --------

KERNELS = preprocess._cpreprocess.available_kernels() if preprocess.has_c_extension() \
    else ("numpy",)


def _with_kernels(name):
    """Context: the C resize kernels `name` for the duration (numpy: no-op)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        if name == "numpy":
            yield
            return
        prev = preprocess._cpreprocess.set_kernels(name)
        try:
            yield
        finally:
            preprocess._cpreprocess.set_kernels(prev)
    return ctx()


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("h,w", [(480, 640), (720, 1280), (1080, 1920), (1080, 1919)])
@pytest.mark.parametrize("which", ["demo_hf", "llava_hf"])
def test_every_kernel_matches_hf_on_camera_frames(kernels, h, w, which, request):
    """The fused resize + crop + normalize on camera-sized frames (and an odd
    width), bit-identical to HF with each kernel."""
    hf = request.getfixturevalue(which)
    img = _rng_image(h, w, seed=11)
    with _with_kernels(kernels):
        ours = ImagePreprocessor.from_hf_processor_config(hf.to_dict())(img)
    np.testing.assert_array_equal(ours, hf(img, return_tensors="np")["pixel_values"])


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("size", [{"height": 32, "width": 600}, {"height": 300, "width": 17}])
def test_every_kernel_matches_hf_with_exact_sizes(kernels, size):
    """Exact-size configs that squash one side: Pillow 13 runs the vertical
    pass first for the first, horizontal first for the second."""
    hf = transformers.CLIPImageProcessor(size=size, do_center_crop=False, resample=3,
                                         image_mean=CLIP_MEAN, image_std=CLIP_STD)
    img = _rng_image(480, 640, seed=12)
    with _with_kernels(kernels):
        ours = ImagePreprocessor.from_hf_processor_config(hf.to_dict())(img)
    np.testing.assert_array_equal(ours, hf(img, return_tensors="np")["pixel_values"])
