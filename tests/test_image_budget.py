"""The image-token budget (runtime/image_budget.py): a budgeted image is
exactly what the HF processor makes with the budgeted settings, it takes at
most the budget in tokens, and the session answers with it."""
import numpy as np
import pytest
from PIL import Image

from vlmedge.errors import UserInputError
from vlmedge.manifest import ImageFacts
from vlmedge.runtime import image_budget
from vlmedge.runtime.preprocess import ImagePreprocessor

transformers = pytest.importorskip("transformers")

IDEFICS3 = {"method": "idefics3", "longest_edge": 1456, "tile_size": 364,
            "do_image_splitting": True, "global_image": True}


def _facts(**kw):
    base = dict(image_token="<image>", image_token_id=5, tokens_per_image=64, feature_dim=8,
                image_placeholder="<image>", expand="idefics3", image_seq_len=64)
    return ImageFacts(**{**base, **kw})


def _rng_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("h,w", [(480, 640), (1080, 1920), (300, 200)])
@pytest.mark.parametrize("budget", [64, 320, 640])
def test_idefics3_budget_equals_hf_at_that_size(h, w, budget):
    hf_default = transformers.Idefics3ImageProcessor()
    cfg = {"resize": "none", "resample": "lanczos", "rescale": 1 / 255,
           "mean": list(hf_default.image_mean), "std": list(hf_default.image_std),
           "tiling": IDEFICS3}
    img = _rng_image(h, w)
    tiling = image_budget.budget_tiling(IDEFICS3, _facts(), (h, w), budget)
    pixels, (rows, cols) = ImagePreprocessor(cfg).preprocess(img, tiling=tiling)
    tiles = pixels.shape[0]
    assert tiles * 64 <= budget and tiles == (rows * cols + 1 if rows else 1)
    hf = transformers.Idefics3ImageProcessor(size={"longest_edge": tiling["longest_edge"]})
    want = hf(Image.fromarray(img), return_tensors="np", return_row_col_info=True)
    assert (rows, cols) == (want["rows"][0][0], want["cols"][0][0])
    np.testing.assert_array_equal(pixels, want["pixel_values"][0])
    # the largest tiling within the budget: one tile-size step more would not fit
    bigger = tiling["longest_edge"] + 364
    if bigger <= 1456:
        assert image_budget.idefics3_tiles(h, w, bigger, 364, True) * 64 > budget


@pytest.mark.parametrize("budget", [16, 100, 1000])
def test_qwen2_vl_budget_equals_hf_at_that_size(budget):
    unit = 28 * 28
    tiling = {"method": "qwen2_vl_patches", "patch_size": 14, "temporal_patch_size": 2,
              "merge_size": 2, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}
    hf_default = transformers.Qwen2VLImageProcessor()
    cfg = {"resize": "none", "resample": "bicubic", "rescale": 1 / 255,
           "mean": list(hf_default.image_mean), "std": list(hf_default.image_std),
           "tiling": tiling}
    img = _rng_image(480, 640)
    t = image_budget.budget_tiling(tiling, _facts(expand="qwen2_vl", merge_size=2), (480, 640),
                                   budget)
    assert t["max_pixels"] == budget * unit
    patches, grid = ImagePreprocessor(cfg).preprocess(img, tiling=t)
    assert grid[0] * grid[1] * grid[2] // 4 <= budget
    hf = transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=budget * unit)
    want = hf(Image.fromarray(img), return_tensors="np")
    np.testing.assert_array_equal(np.asarray(grid)[None], want["image_grid_thw"])
    np.testing.assert_array_equal(patches, want["pixel_values"])


def test_budgets_that_cannot_be_met_are_one_line():
    with pytest.raises(UserInputError, match="at least one tile"):
        image_budget.budget_tiling(IDEFICS3, _facts(), (480, 640), 10)
    with pytest.raises(UserInputError, match="always takes 17 tokens"):
        image_budget.budget_tiling(None, _facts(expand="repeat", tokens_per_image=17),
                                   (128, 128), 8)
    with pytest.raises(UserInputError, match="positive integer"):
        image_budget.budget_tiling(IDEFICS3, _facts(), (480, 640), 0)


def test_session_budget_on_the_demo_model(demo_artifact):
    """A fixed-size family: any budget at or above its tokens changes nothing,
    a smaller one is refused; the timings count the image tokens."""
    from vlmedge.demo import scenes
    from vlmedge.runtime import VLMSession

    s = VLMSession(demo_artifact, provider="cpu", threads=1)
    img = scenes.make_scene(4).image
    r = s.generate(img, "describe the image.", max_image_tokens=100)
    assert r.text == s.generate(img, "describe the image.").text
    assert r.timings["image_tokens"] == s.image_facts.tokens_per_image == 17
    with pytest.raises(UserInputError, match="always takes 17 tokens"):
        s.generate(img, "describe the image.", max_image_tokens=5)
    with pytest.raises(UserInputError, match="max_image_tokens"):
        VLMSession(demo_artifact, provider="cpu", max_image_tokens=-1)


def test_artifact_default_budget(tiny_llava_dir, tmp_path):
    """vlm-export --max-image-tokens records the artifact's default budget;
    a session uses it unless the caller sets its own; one that does not fit
    the family fails the export in one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from vlmedge.demo import scenes
    from vlmedge.runtime import VLMSession

    exe = str(Path(sys.executable).parent / "vlm-export")
    art = tmp_path / "art"
    r = subprocess.run([exe, "--model", str(tiny_llava_dir), "-o", str(art), "--no-validate",
                        "--max-image-tokens", "20"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((art / "manifest.json").read_text())
    assert m["image"]["max_image_tokens"] == 20
    s = VLMSession(art, provider="cpu", threads=1)
    assert s.max_image_tokens == 20
    img = scenes.make_scene(3).image
    assert s.generate(img, "describe the image.", max_new_tokens=2).token_ids
    m["image"]["max_image_tokens"] = 5  # below the fixed image's 17 tokens
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserInputError, match="always takes 17 tokens"):
        VLMSession(art, provider="cpu", threads=1).generate(img, "describe the image.")
    ok = VLMSession(art, provider="cpu", threads=1, max_image_tokens=17)  # the caller's wins
    assert ok.generate(img, "describe the image.", max_new_tokens=2).token_ids
    r = subprocess.run([exe, "--model", str(tiny_llava_dir), "-o", str(tmp_path / "bad"),
                        "--no-validate", "--max-image-tokens", "5"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "always takes 17 tokens" in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("vlm-export: error:")
    assert not (tmp_path / "bad").exists()
