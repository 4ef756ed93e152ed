"""The C preprocessing functions equal their numpy reference, and the resize
equals Pillow's Image.resize bit for bit."""
import numpy as np
import pytest
from PIL import Image

from vlmedge.runtime import preprocess, preprocess_ref

pytestmark = pytest.mark.skipif(not preprocess.has_c_extension(), reason="C extension not built")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 13, 3), (128, 128, 3), (33, 65, 4), (1080, 1920, 3)])
def test_normalize_matches_reference_bit_for_bit(shape):
    rng = np.random.default_rng(sum(shape))
    hwc = rng.integers(0, 256, size=shape, dtype=np.uint8)
    got = preprocess.normalize_to_chw(hwc, 1 / 255, MEAN, STD)
    want = preprocess_ref.normalize_to_chw(hwc, 1 / 255, MEAN, STD)
    assert got.shape == (3,) + shape[:2] and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_normalize_writes_into_caller_buffer():
    hwc = np.full((4, 5, 3), 255, np.uint8)
    out = np.zeros((3, 4, 5), np.float32)
    assert preprocess.normalize_to_chw(hwc, 1 / 255, (0, 0, 0), (1, 1, 1), out=out) is out
    np.testing.assert_allclose(out, 1.0)


@pytest.mark.parametrize("bad", [
    dict(src=np.zeros(10, np.uint8), h=4, w=4, ch=3),            # short buffer
    dict(src=np.zeros(48, np.uint8), h=0, w=4, ch=3),            # 0 height
    dict(src=np.zeros(48, np.uint8), h=4, w=4, ch=2),            # wrong channel count
    dict(src=np.zeros((8, 8, 3), np.uint8)[:, ::2], h=8, w=4, ch=3),  # not contiguous (stride)
])
def test_degenerate_input_is_a_clear_value_error(bad):
    from vlmedge.runtime import _cpreprocess
    out = np.zeros((3, max(bad["h"], 1), bad["w"]), np.float32)
    with pytest.raises(ValueError, match="normalize_to_chw"):
        _cpreprocess.normalize_to_chw(bad["src"], bad["h"], bad["w"], bad["ch"], out,
                                      1 / 255, MEAN, STD)


def test_short_output_buffer_is_refused():
    from vlmedge.runtime import _cpreprocess
    with pytest.raises(ValueError, match="dst too short"):
        _cpreprocess.normalize_to_chw(np.zeros(48, np.uint8), 4, 4, 3,
                                      np.zeros(10, np.float32), 1 / 255, MEAN, STD)


# --- resize: C == numpy reference == Pillow -----------------------------------


BICUBIC, BILINEAR = 3, 2


def _pixels(h, w, ch=3, seed=0):
    return np.random.default_rng(seed + h * 7 + w).integers(0, 256, (h, w, ch), dtype=np.uint8)


def _c_resize(src, oh, ow, f, order=0):
    out = np.empty((oh, ow, src.shape[2]), np.uint8)
    from vlmedge.runtime import _cpreprocess
    _cpreprocess.resize(src, *src.shape, out, oh, ow, f, order)
    return out


def _pil_resize(src, oh, ow, f):
    im = Image.fromarray(src[..., 0] if src.shape[2] == 1 else src)
    out = np.asarray(im.resize((ow, oh), resample=f))
    return out.reshape(oh, ow, src.shape[2])


# (h, w) -> (out_h, out_w): identity, tiny, up, down, mixed, extreme aspect,
# and the shapes where Pillow 13 runs the vertical pass first.
SIZES = [
    ((1, 1), (1, 1)), ((1, 1), (5, 7)), ((2, 3), (7, 5)), ((3, 2), (1, 1)),
    ((7, 5), (128, 91)), ((64, 48), (64, 17)), ((48, 64), (13, 64)),
    ((33, 65), (100, 20)), ((120, 90), (37, 41)), ((90, 120), (41, 37)),
    ((1, 4000), (1, 128)), ((4000, 1), (128, 1)), ((1, 400), (128, 512)),
    ((400, 1), (512, 128)), ((178, 133), (22, 65)), ((631, 192), (79, 19)),
    ((187, 139), (115, 103)),  # the order rule's boundary: h shrinks by exactly 2x the width's
]


@pytest.mark.parametrize("f", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size_in,size_out", SIZES)
def test_resize_equals_reference_and_pillow(size_in, size_out, f):
    src = _pixels(*size_in)
    got = _c_resize(src, *size_out, f)
    np.testing.assert_array_equal(got, preprocess_ref.resize(src, *size_out, f))
    np.testing.assert_array_equal(got, _pil_resize(src, *size_out, f))


@pytest.mark.parametrize("ch", [1, 2, 4])
def test_resize_any_channel_count_equals_reference(ch):
    src = _pixels(37, 53, ch)
    for oh, ow in [(11, 90), (90, 11), (20, 20)]:
        np.testing.assert_array_equal(_c_resize(src, oh, ow, BICUBIC),
                                      preprocess_ref.resize(src, oh, ow, BICUBIC))
    if ch == 1:  # Pillow mode L resizes one band the same way
        np.testing.assert_array_equal(_c_resize(src, 11, 90, BICUBIC),
                                      _pil_resize(src, 11, 90, BICUBIC))


def test_resize_random_shapes_equal_pillow():
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 160, 4))
        f = int(rng.choice([BILINEAR, BICUBIC]))
        src = _pixels(h, w, seed=int(rng.integers(1000)))
        np.testing.assert_array_equal(_c_resize(src, oh, ow, f), _pil_resize(src, oh, ow, f),
                                      err_msg=f"{h}x{w} -> {oh}x{ow} filter {f}")


def test_horizontal_first_order_equals_two_pillow_passes():
    """order=1 is Pillow <= 12: a horizontal pass, then a vertical one."""
    src = _pixels(178, 133)
    two_pass = _pil_resize(_pil_resize(src, 178, 65, BICUBIC), 22, 65, BICUBIC)
    np.testing.assert_array_equal(_c_resize(src, 22, 65, BICUBIC, order=1), two_pass)
    np.testing.assert_array_equal(preprocess_ref.resize(src, 22, 65, BICUBIC, order=1), two_pass)
    assert not np.array_equal(_c_resize(src, 22, 65, BICUBIC, order=0), two_pass)


@pytest.mark.parametrize("short", [128, 336, 384])
def test_4k_frame_down_to_model_sizes(short):
    src = _pixels(2160, 3840)
    oh, ow = short, int(short * 3840 / 2160)
    got = _c_resize(src, oh, ow, BICUBIC)
    np.testing.assert_array_equal(got, _pil_resize(src, oh, ow, BICUBIC))
    # the reference is slow: compare it on the centre crop only
    x0 = (ow - short) // 2
    region = np.empty((short, short, 3), np.uint8)
    preprocess.resize_region(src, oh, ow, (0, x0, short, short), BICUBIC, out=region)
    np.testing.assert_array_equal(region, got[:, x0:x0 + short])
    np.testing.assert_array_equal(
        region, preprocess_ref.resize_region(src, oh, ow, BICUBIC, 0, x0, short, short))


@pytest.mark.parametrize("region", [(0, 0, 1, 1), (3, 5, 10, 7), (0, 40, 64, 24), (63, 63, 1, 1)])
def test_resize_region_is_a_slice_of_the_full_resize(region):
    src = _pixels(150, 200)
    full = _c_resize(src, 64, 64, BICUBIC)
    y0, x0, rh, rw = region
    got = preprocess.resize_region(src, 64, 64, region, "bicubic")
    np.testing.assert_array_equal(got, full[y0:y0 + rh, x0:x0 + rw])
    np.testing.assert_array_equal(
        got, preprocess_ref.resize_region(src, 64, 64, BICUBIC, y0, x0, rh, rw))


@pytest.mark.parametrize("args,match", [
    ((np.zeros(10, np.uint8), 4, 4, 3, np.zeros(48, np.uint8), 4, 4, 3), "src too short"),
    ((np.zeros(48, np.uint8), 4, 4, 3, np.zeros(10, np.uint8), 4, 4, 3), "dst too short"),
    ((np.zeros(48, np.uint8), 0, 4, 3, np.zeros(48, np.uint8), 4, 4, 3), "sizes must be positive"),
    ((np.zeros(48, np.uint8), 4, 4, 3, np.zeros(48, np.uint8), 0, 0, 3), "sizes must be positive"),
    ((np.zeros(48, np.uint8), 4, 4, 5, np.zeros(48, np.uint8), 4, 4, 3), "channels"),
    ((np.zeros(48, np.uint8), 4, 4, 3, np.zeros(48, np.uint8), 4, 4, 0), "filter"),
    ((np.zeros(48, np.uint8), 4, 4, 3, np.zeros(48, np.uint8), 4, 4, 3, 2), "order"),
    ((np.zeros((8, 8, 3), np.uint8)[:, ::2], 8, 4, 3, np.zeros(48, np.uint8), 4, 4, 3),
     "C-contiguous"),
    ((np.zeros(48, np.float32), 4, 4, 3, np.zeros(48, np.uint8), 4, 4, 3), "uint8"),
])
def test_resize_degenerate_input_is_a_clear_value_error(args, match):
    from vlmedge.runtime import _cpreprocess
    with pytest.raises(ValueError, match=match):
        _cpreprocess.resize(*args)


def test_resize_region_outside_the_output_is_refused():
    from vlmedge.runtime import _cpreprocess
    with pytest.raises(ValueError, match="region"):
        _cpreprocess.resize_region(np.zeros(48, np.uint8), 4, 4, 3, np.zeros(48, np.uint8),
                                   4, 4, 3, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="region"):
        preprocess.resize_region(np.zeros((4, 4, 3), np.uint8), 4, 4, (0, 0, 5, 1))


# --- the kernels: every one the CPU has equals Pillow, the reference and the others ---
# (available_kernels(): "portable" everywhere, "avx2" and "avx512vnni" on x86-64
# CPUs that have them; set_kernels switches for these tests only.)

KERNELS = preprocess._cpreprocess.available_kernels() if preprocess.has_c_extension() else ()


@pytest.fixture(params=KERNELS)
def kernels(request):
    from vlmedge.runtime import _cpreprocess
    prev = _cpreprocess.set_kernels(request.param)
    yield request.param
    _cpreprocess.set_kernels(prev)


# Shapes that take the kernels' edge paths: odd widths (the last RGB pixel's
# 3-byte store), 1-pixel rows and columns, upscaling (few taps, a weight of
# exactly 1.0 at 3x), near-identity, hundreds of taps, rows shorter than one
# 32-byte vertical block and just over it, and vertical-first shapes.
KERNEL_SIZES = [
    ((1, 97), (3, 5)), ((97, 1), (5, 3)), ((1, 3), (1, 64)), ((3, 1), (64, 1)),
    ((10, 10), (30, 30)), ((81, 47), (80, 46)), ((2, 4000), (1, 20)), ((4000, 2), (20, 1)),
    ((40, 21), (9, 10)), ((40, 23), (9, 11)), ((300, 41), (33, 37)), ((57, 1921), (13, 227)),
]


@pytest.mark.parametrize("f", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("size_in,size_out", SIZES + KERNEL_SIZES)
def test_every_kernel_equals_pillow(kernels, size_in, size_out, f):
    src = _pixels(*size_in)
    got = _c_resize(src, *size_out, f)
    np.testing.assert_array_equal(got, _pil_resize(src, *size_out, f))
    np.testing.assert_array_equal(got, preprocess_ref.resize(src, *size_out, f))


def _pil_rgbx_resize(src, oh, ow, f):
    """Pillow's RGBX mode resizes all four bands alike (RGBA would premultiply)."""
    h, w, _ = src.shape
    im = Image.frombuffer("RGBX", (w, h), src.tobytes(), "raw", "RGBX", 0, 1)
    return np.frombuffer(im.resize((ow, oh), resample=f).tobytes(), np.uint8).reshape(oh, ow, 4)


@pytest.mark.parametrize("f", [BILINEAR, BICUBIC, 1])
@pytest.mark.parametrize("size_in,size_out", [((37, 53), (11, 20)), ((53, 37), (20, 11)),
                                              ((5, 3), (40, 31)), ((120, 90), (37, 41)),
                                              ((1, 9), (1, 4)), ((631, 192), (79, 19))])
def test_every_kernel_rgba_equals_pillow_rgbx(kernels, size_in, size_out, f):
    src = _pixels(*size_in, ch=4)
    got = _c_resize(src, *size_out, f)
    np.testing.assert_array_equal(got, _pil_rgbx_resize(src, *size_out, f))
    np.testing.assert_array_equal(got, preprocess_ref.resize(src, *size_out, f))


@pytest.mark.parametrize("ch", [1, 2, 3, 4])
def test_kernels_agree_on_random_shapes(ch):
    """Every kernel gives the portable kernel's pixels, both pass orders."""
    from vlmedge.runtime import _cpreprocess
    rng = np.random.default_rng(ch)
    prev = _cpreprocess.kernels()
    try:
        for _ in range(25):
            h, w, oh, ow = (int(v) for v in rng.integers(1, 200, 4))
            f, order = int(rng.integers(1, 6)), int(rng.integers(0, 2))
            src = _pixels(h, w, ch, seed=int(rng.integers(1000)))
            outs = {}
            for name in KERNELS:
                _cpreprocess.set_kernels(name)
                outs[name] = _c_resize(src, oh, ow, f, order)
            for name, got in outs.items():
                np.testing.assert_array_equal(got, outs["portable"],
                                              err_msg=f"{name}: {h}x{w} -> {oh}x{ow} f{f}")
    finally:
        _cpreprocess.set_kernels(prev)


# Regions whose rows or columns start or end at the image edges, single rows
# and columns, and the centre crops of camera frames (horizontal-first) and
# of portrait frames (vertical-first), where the fusion decides which source
# rows and columns are read.
@pytest.mark.parametrize("src_hw,out_hw,region", [
    ((150, 200), (64, 85), (0, 0, 64, 64)), ((150, 200), (64, 85), (0, 21, 64, 64)),
    ((150, 200), (64, 85), (0, 84, 64, 1)), ((150, 200), (64, 85), (63, 0, 1, 85)),
    ((200, 150), (85, 64), (10, 0, 64, 64)), ((200, 150), (30, 64), (0, 3, 30, 7)),
    ((1080, 1920), (128, 227), (0, 49, 128, 128)), ((1920, 1080), (597, 336), (130, 0, 336, 336)),
    ((9, 7), (50, 40), (20, 13, 3, 27)),
])
def test_every_kernel_region_is_a_slice_of_the_full_resize(kernels, src_hw, out_hw, region):
    src = _pixels(*src_hw)
    y0, x0, rh, rw = region
    full = _c_resize(src, *out_hw, BICUBIC)
    got = preprocess.resize_region(src, *out_hw, region, "bicubic")
    np.testing.assert_array_equal(got, full[y0:y0 + rh, x0:x0 + rw])
    if max(src_hw) < 1000:  # the reference is slow on camera frames
        np.testing.assert_array_equal(
            got, preprocess_ref.resize_region(src, *out_hw, BICUBIC, y0, x0, rh, rw))


class _GuardedBuffers:
    """Arrays that end exactly where an inaccessible page begins: a kernel
    that reads or writes one byte past its buffer kills the test (SIGSEGV)."""

    def __init__(self):
        self._keep = []

    def array(self, shape, dtype=np.uint8, fill=None):
        import ctypes
        import mmap
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        page = mmap.PAGESIZE
        npages = -(-nbytes // page) + 1
        mm = mmap.mmap(-1, npages * page)
        raw = (ctypes.c_char * (npages * page)).from_buffer(mm)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        guard = ctypes.addressof(raw) + (npages - 1) * page
        assert libc.mprotect(ctypes.c_void_p(guard), page, 0) == 0, ctypes.get_errno()
        arr = np.frombuffer(mm, np.uint8, nbytes, (npages - 1) * page - nbytes)
        arr = arr.view(dtype).reshape(shape)
        if fill is not None:
            arr[...] = fill
        self._keep.append((mm, raw, arr))
        return arr


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="mprotect: Linux")
@pytest.mark.parametrize("ch", [3, 4])
@pytest.mark.parametrize("src_hw,out_hw", [
    ((1, 1), (1, 1)), ((1, 7), (1, 3)), ((7, 1), (3, 1)), ((2, 3), (9, 5)), ((33, 65), (100, 20)),
    ((120, 90), (37, 41)), ((90, 120), (90, 41)), ((90, 120), (41, 120)), ((1, 400), (128, 512)),
    ((180, 320), (128, 227)), ((1000, 30), (13, 29)),
])
def test_every_kernel_stays_inside_its_buffers(kernels, src_hw, out_hw, ch):
    from vlmedge.runtime import _cpreprocess
    g = _GuardedBuffers()
    pixels = _pixels(*src_hw, ch)
    src = g.array(pixels.shape, fill=pixels)
    oh, ow = out_hw
    dst = g.array((oh, ow, ch))
    _cpreprocess.resize(src, *src_hw, ch, dst, oh, ow, BICUBIC)
    np.testing.assert_array_equal(dst, preprocess_ref.resize(pixels, oh, ow, BICUBIC))
    planes = g.array((3, oh, ow), np.float32)
    _cpreprocess.resize_normalize(src, *src_hw, ch, planes, oh, ow, BICUBIC, 0, 0, oh, ow,
                                  1 / 255, MEAN, STD)
    np.testing.assert_array_equal(planes, preprocess_ref.normalize_to_chw(dst, 1 / 255, MEAN, STD))


# --- resize_normalize: resize_region + normalize_to_chw in one pass -------------

@pytest.mark.parametrize("ch", [3, 4])
@pytest.mark.parametrize("src_hw,out_hw,region", [
    ((150, 200), (64, 85), (0, 10, 64, 64)),   # both passes, horizontal first
    ((200, 150), (30, 64), (0, 0, 30, 64)),    # vertical first
    ((64, 85), (64, 85), (3, 5, 40, 50)),      # no resize: a crop, then normalize
    ((64, 85), (64, 40), (0, 0, 64, 40)),      # horizontal pass only
    ((64, 85), (20, 85), (0, 0, 20, 85)),      # vertical pass only
    ((5, 3), (40, 31), (0, 0, 40, 31)),        # upscaling
    ((1, 1), (1, 1), (0, 0, 1, 1)),
])
def test_resize_normalize_equals_the_two_steps(kernels, src_hw, out_hw, region, ch):
    src = _pixels(*src_hw, ch)
    y0, x0, rh, rw = region
    got = preprocess.resize_normalize(src, *out_hw, region, "bicubic", 1 / 255, MEAN, STD)
    assert got.shape == (3, rh, rw) and got.dtype == np.float32
    u8 = preprocess.resize_region(src, *out_hw, region, "bicubic")
    np.testing.assert_array_equal(got, preprocess.normalize_to_chw(u8, 1 / 255, MEAN, STD))
    np.testing.assert_array_equal(got, preprocess_ref.resize_normalize(
        src, *out_hw, BICUBIC, y0, x0, rh, rw, 1 / 255, MEAN, STD))


def test_resize_normalize_without_the_extension_uses_the_reference(monkeypatch):
    src = _pixels(150, 200)
    want = preprocess.resize_normalize(src, 64, 85, (0, 10, 64, 64), "bicubic", 1 / 255, MEAN, STD)
    monkeypatch.setattr(preprocess, "_cpreprocess", None)
    out = np.empty((3, 64, 64), np.float32)
    got = preprocess.resize_normalize(src, 64, 85, (0, 10, 64, 64), "bicubic", 1 / 255, MEAN, STD,
                                      out=out)
    assert got is out
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("args,match", [
    ((np.zeros(48, np.uint8), 4, 4, 2, np.zeros(96, np.float32), 4, 4, 3, 0, 0, 4, 4), "channels"),
    ((np.zeros(48, np.uint8), 4, 4, 3, np.zeros(47, np.float32), 4, 4, 3, 0, 0, 4, 4),
     "dst too short"),
    ((np.zeros(48, np.uint8), 4, 4, 3, np.zeros(192, np.uint8), 4, 4, 3, 0, 0, 4, 4), "float32"),
    ((np.zeros(48, np.uint8), 4, 4, 3, np.zeros(48, np.float32), 4, 4, 3, 0, 0, 5, 4), "region"),
])
def test_resize_normalize_bad_arguments_are_clear_value_errors(args, match):
    from vlmedge.runtime import _cpreprocess
    with pytest.raises(ValueError, match=match):
        _cpreprocess.resize_normalize(*args, 1 / 255, MEAN, STD)
    with pytest.raises(ValueError, match="std must be non-zero"):
        _cpreprocess.resize_normalize(np.zeros(48, np.uint8), 4, 4, 3, np.zeros(48, np.float32),
                                      4, 4, 3, 0, 0, 4, 4, 1 / 255, MEAN, (1, 0, 1))


def test_kernel_choice_is_reported_and_checked():
    from vlmedge.runtime import _cpreprocess
    names = _cpreprocess.available_kernels()
    assert names[0] == "portable" and _cpreprocess.kernels() in names
    assert _cpreprocess.kernels() == names[-1]  # the import picks the CPU's best
    with pytest.raises(ValueError, match="set_kernels: expected one of"):
        _cpreprocess.set_kernels("sse9")
    assert _cpreprocess.kernels() == names[-1]
