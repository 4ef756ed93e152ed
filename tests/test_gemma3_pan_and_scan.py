"""Gemma 3's pan-and-scan (do_pan_and_scan): an elongated image is encoded as
the whole image plus 2..max_num_crops crops along its long side, each one
more image block in the prompt ("Here is the original image ... and here are
some crops to help you see better ..."). The crops equal transformers'
Gemma3ImageProcessor's on many sizes; a tiny random model exported with it
takes raw images of several sizes to the processor's pixel_values (bit for
bit), prompt ids and transformers' greedy tokens, one image or two; the
image-token budget lowers the crop count as the processor's own setting
would; bad settings are refused in one line."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from family_testing import assert_same_without_torch  # noqa: E402
from family_testing import session as _session  # noqa: E402
from family_testing import torch_generate as _torch_generate  # noqa: E402
from test_families import _hf_ids, _image  # noqa: E402
from test_gemma3 import QUESTION, TOKENS, build_gemma3  # noqa: E402

from vlmedge import manifest  # noqa: E402
from vlmedge.errors import ModelDirError, UserInputError  # noqa: E402
from vlmedge.runtime.preprocess import pan_and_scan_crops  # noqa: E402


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_gemma3(tmp_path_factory.mktemp("tiny_gemma3_pas"))


@pytest.fixture(scope="module")
def artifact(src, tmp_path_factory):
    """`vlm-export --pan-and-scan` (the processor's settings: crops of at least
    256 px, at most 4, from an aspect ratio of 1.2)."""
    from vlmedge.export import exporter

    art = tmp_path_factory.mktemp("gemma3_pas_art") / "tiny-gemma3-pas"
    return art, exporter.run_export(exporter.ExportOptions(model_dir=src, output=art,
                                                           pan_and_scan=True),
                                    log=lambda s: None)


@pytest.fixture(scope="module")
def loaded(src):
    """The PyTorch side with the processor cropping, as the export loads it."""
    from vlmedge.export import loading
    return loading.load(src, pan_and_scan=True)


# (width, height): 3, 2, 3 (tall) and 4 (capped) crops; square and nearly square
# (none); crops under 256 px (none: too short, too small)
SIZES = [(900, 300), (600, 280), (300, 800), (1400, 260), (300, 300), (320, 280), (700, 200),
         (100, 40)]


def _tiling(**kw):
    return {"method": "pan_and_scan", "size": [64, 64], "min_crop_size": 256,
            "max_num_crops": 4, "min_ratio": 1.2, **kw}


# -- the crops, against the processor's own function -------------------------------

@pytest.mark.parametrize("settings", [dict(min_crop_size=256, max_num_crops=4, min_ratio=1.2),
                                      dict(min_crop_size=24, max_num_crops=4, min_ratio=1.2),
                                      dict(min_crop_size=10, max_num_crops=7, min_ratio=1.05),
                                      dict(min_crop_size=1, max_num_crops=3, min_ratio=1.0)])
def test_crops_equal_the_processors(settings):
    """On 300 sizes from 1 to 2,000 px a side: the same crops, each the same
    pixels, as Gemma3ImageProcessorPil.pan_and_scan (channels-first slices)."""
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil()
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 2000, (300, 2))]
    sizes += [(5, 20), (20, 5), (100, 100), (256, 512), (512, 256), (100, 121), (99, 121)]
    made = 0
    for h, w in sizes:
        image = np.arange(h * w, dtype=np.int64).reshape(1, h, w)  # each pixel its own value
        want = ip.pan_and_scan(image, settings["min_crop_size"], settings["max_num_crops"],
                               settings["min_ratio"])
        want = [c for c in want if c.size]  # see pan_and_scan_crops: empty crops are dropped
        got = pan_and_scan_crops(h, w, _tiling(**settings))
        assert len(got) == len(want), (h, w)
        for (y0, x0, ch, cw), ref in zip(got, want):
            np.testing.assert_array_equal(image[:, y0:y0 + ch, x0:x0 + cw], ref)
        made += bool(got)
    assert made > 30  # the sizes exercise cropping, not only its refusals


def test_no_crops_when_max_is_zero():
    assert pan_and_scan_crops(40, 400, _tiling(min_crop_size=10)) != []
    assert pan_and_scan_crops(40, 400, _tiling(min_crop_size=10, max_num_crops=0)) == []


@pytest.mark.parametrize("change,match", [
    (dict(max_num_crops=-1), "max_num_crops"), (dict(max_num_crops=1000), "max_num_crops"),
    (dict(min_ratio=0.5), "min_ratio"), (dict(min_ratio=float("nan")), "min_ratio"),
    (dict(min_crop_size=0), "min_crop_size"), (dict(size=[64]), "size")])
def test_bad_tiling_is_refused_in_one_line(change, match):
    from vlmedge.runtime.preprocess import ImagePreprocessor

    with pytest.raises(UserInputError, match=match) as e:
        ImagePreprocessor({"resize": "exact", "size": [64, 64], "tiling": _tiling(**change)})
    assert "\n" not in str(e.value)


# -- the export ----------------------------------------------------------------------

def test_exports_validates_and_records_the_tiling(artifact):
    art, summary = artifact
    v = summary["validation"]
    assert v["passed"] and v["tokens_match"] and v["prompt_ids_match"], v
    m = manifest.load(art)
    assert m.image.expand == "wrap"
    assert m.preprocess["tiling"] == {"method": "pan_and_scan", "size": [64, 64],
                                      "min_crop_size": 256, "max_num_crops": 4,
                                      "min_ratio": 1.2}


def test_image_text_equals_the_processors(artifact, loaded):
    from vlmedge.runtime.adapters import adapter_for

    adapter = adapter_for(manifest.load(artifact[0]).image)
    for n in range(5):
        assert adapter.image_text(n) == loaded.processor.replace_image_token(
            {"num_crops": [n]}, 0), n
        assert adapter.image_token_count(n) == TOKENS * (1 + n)
    assert adapter.image_text(None) == adapter.image_text(0)
    for bad in (-1, 1.5, True, (1, 2)):
        with pytest.raises(UserInputError, match="crop count") as e:
            adapter.image_text(bad)
        assert "\n" not in str(e.value)


def test_a_wrap_manifest_refuses_other_tilings(artifact):
    from vlmedge.errors import ArtifactError

    m = manifest.read_json(artifact[0])
    m["preprocess"]["tiling"] = {"method": "internvl", "tile_size": 64, "min_patches": 1,
                                 "max_patches": 4, "crop_to_patches": False,
                                 "use_thumbnail": True}
    with pytest.raises(ArtifactError, match="pan_and_scan") as e:
        manifest.Manifest.from_dict(m)
    assert "\n" not in str(e.value)


def test_do_pan_and_scan_in_the_config_turns_it_on(src, tmp_path):
    """A model directory whose preprocessor_config.json sets do_pan_and_scan
    exports with the crops too (Gemma3Processor itself overrides that setting
    per call, so the export sets it on the processor: one switch)."""
    import shutil

    from vlmedge.export import loading

    d = tmp_path / "config-on"
    shutil.copytree(src, d)
    cfg = json.loads((d / "preprocessor_config.json").read_text())
    (d / "preprocessor_config.json").write_text(json.dumps({**cfg, "do_pan_and_scan": True}))
    for path, on in ((src, False), (d, True)):
        l = loading.load(path)
        tiling = l.family.preprocess_config(l.processor)["tiling"]
        assert (tiling is not None and tiling["method"] == "pan_and_scan") == on
        pixels = l.processor(images=_image(900, 300), text="<start_of_image>",
                             return_tensors="np")["pixel_values"]
        assert pixels.shape[0] == (4 if on else 1)


@pytest.mark.parametrize("key,value", [("pan_and_scan_max_num_crops", 0),
                                       ("pan_and_scan_min_crop_size", -3),
                                       ("pan_and_scan_min_ratio_to_activate", 0.5),
                                       # the runtime's bounds too: refused at export, not
                                       # later in validation (nor by every session)
                                       ("pan_and_scan_max_num_crops", 65),
                                       ("pan_and_scan_max_num_crops", True),
                                       ("pan_and_scan_min_ratio_to_activate", float("inf"))])
def test_bad_pan_and_scan_settings_are_refused(loaded, key, value):
    import copy

    proc = copy.copy(loaded.processor)
    proc.images_kwargs = {**proc.images_kwargs, key: value}
    with pytest.raises(ModelDirError, match="pan-and-scan") as e:
        loaded.family.preprocess_config(proc)
    assert "\n" not in str(e.value)


def test_pan_and_scan_is_refused_for_other_families(tmp_path):
    """`vlm-export --pan-and-scan` on a LLaVA (the demo): one line, before any
    weight is read, nothing written."""
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "vlm-export")
    r = subprocess.run([exe, "--model", "demo", "--pan-and-scan", "--output",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("vlm-export: error")]
    assert len(lines) == 1 and "Gemma 3" in lines[0], r.stderr[-800:]
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


# -- the runtime on raw images --------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_preprocessing_and_prompt_equal_the_processor(size, artifact, loaded):
    s = _session(artifact[0])
    image = _image(*size)
    hf = _hf_ids(loaded.processor, image)
    pixels, grid = s.preprocess(image)
    assert grid == hf["pixel_values"].shape[0] - 1  # the whole image, then its crops
    np.testing.assert_array_equal(pixels, hf["pixel_values"].numpy())
    ids = hf["input_ids"][0].tolist()
    assert s.chat.prompt_ids(QUESTION, image_grid=grid) == ids
    assert ids.count(s.chat.image_token_id) == TOKENS * (1 + grid)


def test_sizes_cover_crop_counts(artifact):
    """The sizes above make 0, 2, 3 and 4 crops (so the tests are not all one case)."""
    s = _session(artifact[0])
    counts = {s.preprocess(_image(*size))[1] for size in SIZES}
    assert counts == {0, 2, 3, 4}


@pytest.mark.parametrize("size", [(900, 300), (300, 800)])
def test_generate_on_raw_image_equals_torch(size, artifact, loaded):
    """The whole image and its crops, each its own block of both-way attention:
    greedy tokens equal transformers' generate with its KV cache."""
    s = _session(artifact[0])
    image = _image(*size)
    hf = dict(loaded.family.hf_inputs(loaded.processor, image, QUESTION))
    assert hf["pixel_values"].shape[0] == 4  # 3 crops
    want = _torch_generate(loaded, hf, 10, s.chat.stop_token_ids)
    r = s.generate(image, QUESTION, max_new_tokens=10)
    assert r.token_ids == want
    assert r.timings["image_tokens"] == hf["input_ids"][0].tolist().count(
        s.chat.image_token_id) > TOKENS


def test_two_cropped_images_equal_torch(artifact, loaded):
    s = _session(artifact[0])
    a, b = _image(900, 300, seed=1), _image(300, 300, seed=2)  # 3 crops, none
    q = "<image> is it like <image>?"
    content = [{"type": "image"}, {"type": "text", "text": " is it like "}, {"type": "image"},
               {"type": "text", "text": "?"}]
    text = loaded.processor.apply_chat_template([{"role": "user", "content": content}],
                                                add_generation_prompt=True)
    hf = dict(loaded.processor(images=[a, b], text=text, return_tensors="pt"))
    assert hf["pixel_values"].shape[0] == 3 + 1 + 1
    want = _torch_generate(loaded, hf, 8, s.chat.stop_token_ids)
    r = s.generate([a, b], q, max_new_tokens=8)
    assert r.token_ids == want
    assert r.timings["image_tokens"] == (4 + 1) * TOKENS


@pytest.mark.parametrize("budget,crops", [(TOKENS, 0), (2 * TOKENS, 0), (3 * TOKENS, 2),
                                          (4 * TOKENS, 3), (100 * TOKENS, 4)])
def test_budget_lowers_the_crop_count_as_the_processor_would(budget, crops, artifact, loaded):
    """A 1400 x 260 image makes 4 crops; a budget of k images' tokens keeps k - 1
    crops (none below 2: one crop would be the whole image again), and the pixels are
    the processor's with that pan_and_scan_max_num_crops (or without
    pan-and-scan)."""
    s = _session(artifact[0])
    image = _image(1400, 260)
    enc = s.encode(image, max_image_tokens=budget)
    assert enc.grid == crops
    kw = dict(pan_and_scan_max_num_crops=crops) if crops else dict(do_pan_and_scan=False)
    hf = loaded.processor(images=image, text="<start_of_image>", return_tensors="np", **kw)
    pixels, grid = s._preprocess(image, "RGB", max_image_tokens=budget)
    assert grid == crops
    np.testing.assert_array_equal(pixels, hf["pixel_values"])
    r = s.generate(image, QUESTION, max_new_tokens=2, max_image_tokens=budget)
    assert r.timings["image_tokens"] == TOKENS * (1 + crops) <= budget


def test_budget_below_one_image_is_refused(artifact):
    s = _session(artifact[0])
    with pytest.raises(UserInputError, match="max_image_tokens") as e:
        s.generate(_image(1400, 260), QUESTION, max_new_tokens=2, max_image_tokens=TOKENS - 1)
    assert "\n" not in str(e.value)


def test_raw_image_generation_without_torch(artifact, tmp_path):
    assert_same_without_torch(artifact[0], _image(900, 300), tmp_path, QUESTION)


def test_tensorrt_profiles_count_the_crops(artifact):
    """The TensorRT plan's image-token range runs from one view (no crops) to
    the whole image plus max_num_crops crops, its opt a 640 x 480 frame's 3
    views; the vision graph takes one view per call; `covers` says so."""
    from vlmedge.export.trt import profiles

    m = manifest.read_json(artifact[0])
    lim = profiles.Limits(max_context=4096, max_batch=1, max_images=2)
    dims, toks = profiles._image_ranges(m, lim)
    assert toks == (TOKENS, 3 * TOKENS, 5 * TOKENS)  # max_num_crops 4
    assert dims["batch"] == (1, 1, 2 * 5)
    prefill = profiles.dim_ranges(m, lim)["decoder"][0][1]
    assert prefill["sequence_length"][1] >= 3 * TOKENS  # the typical prompt holds the crops
    assert "4 pan-and-scan crops" in profiles.covers(m, lim)
