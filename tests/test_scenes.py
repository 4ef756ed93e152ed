"""The scene world is deterministic and its answers agree with the pixels."""
import numpy as np
import pytest

from vlmedge.demo import scenes


def test_same_seed_same_scene_and_questions():
    a, b = scenes.make_scene(1234), scenes.make_scene(1234)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.objects == b.objects
    assert scenes.questions(a) == scenes.questions(b)
    c = scenes.make_scene(1235)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_eval_items_are_reproducible_and_disjoint_from_training():
    items = scenes.eval_items(50, seed=0)
    assert [(s.seed, q) for s, q in items] == [(s.seed, q) for s, q in scenes.eval_items(50, 0)]
    assert all(s.seed >= scenes.EVAL_SEED_BASE for s, _ in items)
    assert scenes.EVAL_SEED_BASE >= scenes.TRAIN_SEEDS.stop
    kinds = {q.kind for _, q in items}
    assert kinds == set(scenes.QUESTION_KINDS)
    assert {s.seed for s, _ in scenes.eval_items(20, 1)}.isdisjoint({s.seed for s, _ in items})


def _colour_mask(pixels: np.ndarray, rgb) -> np.ndarray:
    # Noise is sigma 6 per channel; backgrounds are muted (40..165); shape colours saturated.
    d = np.abs(pixels.astype(np.int32) - np.array(rgb)).max(axis=2)
    return d < 30


@pytest.mark.parametrize("seed", range(40))
def test_answers_agree_with_drawn_pixels(seed):
    scene = scenes.make_scene(seed)
    px = np.asarray(scene.image)
    assert px.shape == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3)
    assert 1 <= len(scene.objects) <= 3
    for o in scene.objects:
        mask = _colour_mask(px, scenes.COLORS[o.color])
        area = mask.sum()
        ys, xs = np.nonzero(mask)
        # The colour is where the object is, and only there (colours are unique).
        assert area > 40, (o, area)
        cy, cx = ys.mean(), xs.mean()
        half = scenes.IMAGE_SIZE / 2
        vertical = "top" if cy < half else "bottom"
        horizontal = "left" if cx < half else "right"
        assert o.position == f"{vertical} {horizontal}"
        # Size: a large shape's bounding box is clearly wider than any small one's
        # (largest small: diamond, ~18 px; smallest large: triangle, ~23 px).
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert (max(h, w) > 20) == (o.size == "large"), (o, h, w)
        # Shape: fill ratio of the bounding box tells square (~1), circle (~0.79),
        # diamond and triangle (~0.5).
        fill = area / (h * w)
        if o.shape == "square":
            assert fill > 0.85
        elif o.shape == "circle":
            assert 0.65 < fill < 0.88
        else:
            assert fill < 0.65
    # The questions' answers follow from the objects.
    qs = {q.kind: q for q in scenes.questions(scene)}
    assert qs["caption"].answer == scenes.caption(scene)
    names = {o.name for o in scene.objects}
    asked = qs["yesno"].question.removeprefix("is there a ").rstrip("?")
    assert qs["yesno"].answer == ("yes" if asked in names else "no")
    count_q = qs["count"]
    if "small" in count_q.question or "large" in count_q.question:
        size = "small" if "small" in count_q.question else "large"
        n = sum(o.size == size for o in scene.objects)
    else:
        n = len(scene.objects)
    assert count_q.answer == scenes.NUMBER_WORDS[n]


def test_vocabulary_covers_every_question_and_answer():
    import re
    # The demo tokenizer's split: box coordinates, words, each punctuation mark.
    split = re.compile(r"\d+\.\d+|\w+|[^\w\s]").findall
    vocab = set(scenes.vocabulary())
    for seed in range(200):
        for q in scenes.questions(scenes.make_scene(seed)):
            words = split(q.question) + split(q.answer)
            assert set(words) <= vocab, set(words) - vocab


@pytest.mark.parametrize("seed", range(40))
def test_box_answers_hold_the_drawn_object(seed):
    """The true box covers the object's pixels and little else: IoU >= 0.7
    with the box of its colour's pixels (the drawn extent is a pixel wider)."""
    scene = scenes.make_scene(seed)
    px = np.asarray(scene.image)
    q = scenes.questions(scene)[-1]
    assert q.kind == "box" and q.question.startswith("find the ")
    target = next(o for o in scene.objects if q.question == f"find the {o.name}.")
    box = scenes.read_box(q.answer)
    # the answer's two decimals are within one step of the exact extent
    assert max(abs(a - b) for a, b in zip(box, target.box)) <= scenes.IMAGE_SIZE / 200 + 1e-9
    ys, xs = np.nonzero(_colour_mask(px, scenes.COLORS[target.color]))
    drawn = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert scenes.iou(box, drawn) >= 0.7, (box, drawn)
    for o in scene.objects:  # another object's box is not this one
        if o is not target:
            assert scenes.iou(o.box, target.box) == 0.0


def test_box_scoring_rule():
    q = scenes.Question("box", "find the red circle.", "[0.25, 0.25, 0.50, 0.50]")
    assert scenes.read_box(q.answer) == (32.0, 32.0, 64.0, 64.0)
    assert scenes.is_right(q.kind, q.answer, "[ 0.25, 0.25, 0.50, 0.50 ]")
    assert scenes.is_right(q.kind, q.answer, "[0.27, 0.27, 0.52, 0.52]")      # IoU 0.72
    assert not scenes.is_right(q.kind, q.answer, "[0.35, 0.35, 0.60, 0.60]")  # IoU 0.22
    assert not scenes.is_right(q.kind, q.answer, "top left")
    assert not scenes.is_right(q.kind, q.answer, "[0.25, 0.25, 0.50]")
    assert scenes.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert scenes.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    # every other kind: exact match up to case, spaces and a final full stop
    assert scenes.is_right("color", "red", " Red. ") and not scenes.is_right("color", "red", "blue")
