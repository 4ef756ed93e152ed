"""The C preprocessing functions equal their numpy reference."""
import numpy as np
import pytest

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
