"""Several images in one prompt (issue 13): for each family that takes them
(LLaVA, Idefics3, SmolVLM, Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, InternVL) the runtime's
prompt ids for two or three images of different sizes equal the HF
processor's for the same chat-template messages, and greedy
VLMSession.generate([a, b], prompt) equals transformers'
model.generate(do_sample=False) on the processor's inputs, with the images
first (the default) or at <image> markers mid-prompt. Mismatched markers and
families that pack several images differently (LLaVA-OneVision) are refused
in one line; one image keeps its one-image path."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
PIL = pytest.importorskip("PIL.Image")

from test_families import BUILDERS as FAMILY_BUILDERS  # noqa: E402
from test_families import _image  # noqa: E402
from test_llava_next import build_llava_next, build_onevision  # noqa: E402
from test_internvl import build_internvl  # noqa: E402
from test_smolvlm import build_smolvlm  # noqa: E402

from vlmedge.errors import UserInputError  # noqa: E402

QUESTION = "what color is the circle?"
BUILDERS = {**FAMILY_BUILDERS, "smolvlm": build_smolvlm, "llava_next": build_llava_next,
            "llava_onevision": build_onevision, "internvl": build_internvl}
MULTI = ["llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "llava_next", "internvl"]
# (w, h) per family: sizes whose grids differ (tiles, patch grids, pinpoints)
SIZES = {"llava": [(96, 160), (200, 120)],
         "idefics3": [(300, 90), (50, 128), (128, 128)],
         "smolvlm": [(300, 90), (50, 128)],
         "qwen2_vl": [(128, 128), (40, 120), (200, 64)],
         "qwen2_5_vl": [(200, 64), (50, 128)],
         "llava_next": [(300, 90), (50, 128)],
         "internvl": [(100, 40), (80, 80)]}


@pytest.fixture(scope="module")
def family(request, tmp_path_factory):
    """name -> (LoadedModel, VLMSession): each model built, loaded and
    exported once, on first use."""
    from vlmedge.export import exporter, loading
    from vlmedge.runtime import VLMSession

    cache: dict = {}

    def get(name):
        if name not in cache:
            if name == "llava":  # conftest's tiny LLaVA (demo tokenizer and processor)
                src = request.getfixturevalue("tiny_llava_dir")
                art = request.getfixturevalue("tiny_llava_artifact")[0]
            else:
                src = BUILDERS[name](tmp_path_factory.mktemp(f"mi_{name}"))
                art = tmp_path_factory.mktemp("mi_arts") / name
                exporter.run_export(exporter.ExportOptions(model_dir=src, output=art),
                                    log=lambda s: None)
            cache[name] = (loading.load(src), VLMSession(art, provider="cpu", threads=1))
        return cache[name]
    return get


def _images(name):
    return [_image(w, h, seed=3 + i) for i, (w, h) in enumerate(SIZES[name])]


def _parts(prompt: str, n: int) -> list[dict]:
    """The HF chat messages' content for a runtime prompt: images at its
    <image> markers, else all first (what the runtime renders)."""
    pieces = prompt.split("<image>")
    if len(pieces) == 1:
        return [{"type": "image"}] * n + [{"type": "text", "text": prompt}]
    out = []
    for i, piece in enumerate(pieces):
        out += ([{"type": "image"}] if i else []) + \
            ([{"type": "text", "text": piece}] if piece else [])
    return out


def _hf(lm, images, prompt, nested=False):
    """The processor's inputs; nested: the images as one sample's list, as
    apply_chat_template(tokenize=True) passes a conversation's images (LLaVA-
    OneVision reads batch_num_images from that nesting)."""
    msgs = [{"role": "user", "content": _parts(prompt, len(images))}]
    text = lm.processor.apply_chat_template(msgs, add_generation_prompt=True)
    return dict(lm.processor(images=[images] if nested else images, text=text,
                             return_tensors="pt"))


def _torch_tokens(lm, hf, stop_ids, n=8):
    """transformers' greedy tokens, cut before the first stop token (as
    generate() leaves it out)."""
    with torch.inference_mode():
        out = lm.model.generate(**hf, max_new_tokens=n, do_sample=False)
    ref = out[0, hf["input_ids"].shape[1]:].tolist()
    stops = [i for i, t in enumerate(ref) if t in stop_ids]
    return ref[:stops[0]] if stops else ref


def _grids(s, images):
    return [s.preprocess(im)[1] for im in images]


MARKED = "compare <image> with <image> : " + QUESTION


@pytest.mark.parametrize("name", MULTI)
def test_prompt_ids_equal_processor(name, family):
    """Images first (the default) and at <image> markers mid-prompt: the
    runtime's ids, each image expanded by its own grid, are the processor's."""
    lm, s = family(name)
    images = _images(name)
    ref = _hf(lm, images, QUESTION)["input_ids"][0].tolist()
    assert s.chat.prompt_ids(QUESTION, image_grids=_grids(s, images)) == ref
    two = images[:2]
    ref = _hf(lm, two, MARKED)["input_ids"][0].tolist()
    assert s.chat.prompt_ids(MARKED, image_grids=_grids(s, two)) == ref


@pytest.mark.parametrize("name", MULTI)
def test_generate_equals_transformers(name, family):
    """generate([a, b, ...], prompt) = transformers' greedy tokens on the
    processor's inputs for the same images and messages."""
    lm, s = family(name)
    images = _images(name)
    hf = _hf(lm, images, QUESTION)
    want = _torch_tokens(lm, hf, s.chat.stop_token_ids)
    r = s.generate(images, QUESTION, max_new_tokens=8)
    assert r.token_ids == want, (r.token_ids, want)
    assert r.prompt_tokens == hf["input_ids"].shape[1]
    assert r.timings["image_tokens"] == int(hf["input_ids"].eq(s.chat.image_token_id).sum())
    assert r.timings["images"] == len(images)


@pytest.mark.parametrize("name", ["llava", "idefics3", "qwen2_vl", "llava_next", "internvl"])
def test_markers_mid_prompt_generate_equals_transformers(name, family):
    lm, s = family(name)
    images = _images(name)[:2]
    want = _torch_tokens(lm, _hf(lm, images, MARKED), s.chat.stop_token_ids)
    assert s.generate(images, MARKED, max_new_tokens=8).token_ids == want
    # Swapping the images changes the answer's inputs, as it does in transformers.
    swapped = _torch_tokens(lm, _hf(lm, images[::-1], MARKED), s.chat.stop_token_ids)
    assert s.generate(images[::-1], MARKED, max_new_tokens=8).token_ids == swapped


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_positions_over_several_grids_equal_transformers(name, family):
    from vlmedge.runtime import mrope

    lm, s = family(name)
    hf = _hf(lm, _images(name), QUESTION)
    grids = [tuple(g) for g in hf["image_grid_thw"].tolist()]
    ref, delta = lm.model.model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"],
                                               image_grid_thw=hf["image_grid_thw"])
    ids = hf["input_ids"][0].tolist()
    pos = mrope.rope_index(ids, s.chat.image_token_id, grids, 2)
    np.testing.assert_array_equal(pos, ref[:, 0].numpy())
    _, offset = mrope.MropePositions(s.chat.image_token_id, 2)(0, 0, len(ids), ids, grids)
    assert offset == int(delta)
    with pytest.raises(UserInputError, match="fewer runs"):
        mrope.rope_index(ids, s.chat.image_token_id, grids + [grids[0]], 2)


def test_encoded_images_stream_and_ask(family):
    """EncodedImages mix with raw images in the list; stream() joins to
    generate()'s text; ask() answers each question as generate()."""
    lm, s = family("qwen2_vl")
    a, b = _images("qwen2_vl")[:2]
    want = s.generate([a, b], QUESTION, max_new_tokens=6)
    assert s.generate([s.encode(a), b], QUESTION, max_new_tokens=6).token_ids == want.token_ids
    assert "".join(s.stream([a, b], QUESTION, max_new_tokens=6)) == want.text
    qs = [QUESTION, "describe the image."]
    answers = s.ask([a, b], qs, max_new_tokens=6)
    assert [r.token_ids for r in answers] == \
        [s.generate([a, b], q, max_new_tokens=6).token_ids for q in qs]


def test_one_image_keeps_its_path(family):
    """A list of one image is the one-image call (prefix reuse included)."""
    lm, s = family("idefics3")
    a = _images("idefics3")[0]
    assert s.generate([a], QUESTION, max_new_tokens=6).token_ids == \
        s.generate(a, QUESTION, max_new_tokens=6).token_ids
    enc = s.encode(a)
    s.generate([enc], QUESTION, max_new_tokens=2)
    r = s.generate(enc, QUESTION, max_new_tokens=2)
    assert r.timings["prefix_reused"]
    # One <image> marker for one image places it in the text.
    lm_ids = _hf(lm, [a], "look: <image> " + QUESTION)["input_ids"][0].tolist()
    assert s.chat.prompt_ids("look: <image> " + QUESTION, image_grids=_grids(s, [a])) == lm_ids
    # ask() with markers after text that differs between questions shares no prefix.
    qs = ["look: <image> " + QUESTION, "see <image> describe the image."]
    answers = s.ask(a, qs, max_new_tokens=4)
    assert [r.token_ids for r in answers] == \
        [s.generate(a, q, max_new_tokens=4).token_ids for q in qs]
    assert answers[0].timings["shared_tokens"] == 0


def test_image_token_budget_is_per_image(family):
    lm, s = family("idefics3")
    images = _images("idefics3")
    full = s.generate(images, QUESTION, max_new_tokens=1)
    small = s.generate(images, QUESTION, max_new_tokens=1, max_image_tokens=4)
    assert small.timings["image_tokens"] == 4 * len(images) < full.timings["image_tokens"]


def _one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text and text.isprintable()
    return text


def test_refusals_are_one_line(family):
    _, s = family("llava")
    a, b = _images("llava")
    for prompt, images in (("<image> " + QUESTION, [a, b]), (MARKED, [a]),
                           ("<image> " + QUESTION, None), (MARKED, [a, b, a])):
        with pytest.raises(UserInputError) as e:
            s.generate(images, prompt, max_new_tokens=2)
        assert "markers" in _one_line(e)
    with pytest.raises(UserInputError) as e:
        s.encode([a, b])
    assert "one image" in _one_line(e)
    with pytest.raises(UserInputError) as e:
        s.generate([a, None], QUESTION, max_new_tokens=2)
    assert "image" in _one_line(e)
    from vlmedge.runtime.session import MAX_IMAGES
    with pytest.raises(UserInputError) as e:  # refused before any image is preprocessed
        s.generate([a] * (MAX_IMAGES + 1), QUESTION, max_new_tokens=2)
    assert "too many images" in _one_line(e)
    # Other placeholders stay refused in the text.
    _, q = family("qwen2_vl")
    with pytest.raises(UserInputError) as e:
        q.generate([a, b], "<|image_pad|> " + QUESTION, max_new_tokens=2)
    assert "placeholder" in _one_line(e)


def test_onevision_several_images_equal_transformers(family):
    """LLaVA-OneVision's own path for several images in one prompt (each padded
    to a square of the mean colour, resized to one tile: its features and one
    newline): pixels bit for bit, ids and greedy tokens equal transformers',
    markers mid-prompt too; ask() and images encoded with several=True take
    it; one image keeps the anyres path; an image encoded alone is refused
    beside others (and one encoded for several alone), in one line."""
    lm, s = family("llava_onevision")
    a, b = _images("llava_next")  # wide and tall: the padding differs
    hf = _hf(lm, [a, b], QUESTION, nested=True)
    assert hf["batch_num_images"].tolist() == [2]
    for i, im in enumerate((a, b)):
        pixels, grid = s._preprocess(im, "RGB", several=True)
        assert grid == (im.height, im.width, 0, 0)
        np.testing.assert_array_equal(pixels, hf["pixel_values"][i, :1].numpy())
    want = _torch_tokens(lm, hf, s.chat.stop_token_ids)
    r = s.generate([a, b], QUESTION, max_new_tokens=8)
    assert r.token_ids == want, (r.token_ids, want)
    side = s.image_facts.tile_size // s.image_facts.patch_size
    assert r.timings["image_tokens"] == int(hf["input_ids"].eq(s.chat.image_token_id).sum()) \
        == 2 * (side * side + 1)
    marked = _hf(lm, [a, b], MARKED, nested=True)
    assert s.generate([a, b], MARKED, max_new_tokens=8).token_ids == \
        _torch_tokens(lm, marked, s.chat.stop_token_ids)
    assert s.ask([a, b], [QUESTION], max_new_tokens=8)[0].token_ids == want
    encs = [s.encode(im, several=True) for im in (a, b)]
    assert s.generate(encs, QUESTION, max_new_tokens=8).token_ids == want
    for bad in ([s.encode(a), s.encode(b)], encs[0]):
        with pytest.raises(UserInputError) as e:
            s.generate(bad, QUESTION, max_new_tokens=2)
        assert "alone and beside other images" in _one_line(e)
    assert s.generate([a], QUESTION, max_new_tokens=2).token_ids == \
        s.generate(a, QUESTION, max_new_tokens=2).token_ids


def _vlm_run(*args):
    return subprocess.run([str(Path(sys.executable).parent / "vlm-run"), *map(str, args),
                           "--provider", "cpu", "--threads", "1"],
                          capture_output=True, text=True, timeout=180)


def test_vlm_run_repeated_image(family, tmp_path):
    """Repeated --image: every prompt about all the images (LLaVA-OneVision on
    its several-image path too); more images than a prompt takes are refused
    in one line."""
    _, s = family("qwen2_vl")
    paths = []
    for i, im in enumerate(_images("qwen2_vl")[:2]):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    want = s.generate([str(p) for p in paths], QUESTION, max_new_tokens=4).token_ids
    r = _vlm_run(s.directory, "--image", paths[0], "--image", paths[1], "--prompt", QUESTION,
                 "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want
    _, ov = family("llava_onevision")
    want = ov.generate([str(p) for p in paths], QUESTION, max_new_tokens=4).token_ids
    r = _vlm_run(ov.directory, "--image", paths[0], "--image", paths[1], "--prompt", QUESTION,
                 "-n", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want
    from vlmedge.runtime.session import MAX_IMAGES
    r = _vlm_run(s.directory, *[a for _ in range(MAX_IMAGES + 1) for a in ("--image", paths[0])],
                 "-n", "2")
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "too many images in one prompt" in lines[0], r.stderr
