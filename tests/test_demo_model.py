"""The bundled demo VLM: loads offline from package data, answers held-out
questions; vlm-eval's contract and its bad-input handling."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def _eval(*args, timeout=900):
    exe = str(Path(sys.executable).parent / "vlm-eval")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "PATH": str(Path(sys.executable).parent)})


def test_demo_loads_offline_and_answers_held_out_questions(demo_dir):
    from vlmedge.benchmarks import scene_eval
    from vlmedge.benchmarks.torch_answerer import TorchAnswerer

    answerer = TorchAnswerer(demo_dir)
    result = scene_eval.evaluate(answerer, n=28, seed=3)  # 3-4 of each of the 8 kinds, unseen scenes
    assert result["accuracy"] >= 0.85, result["wrong"]


def test_vlm_eval_json_contract():
    r = _eval("--model", "demo", "--n", "14", "--seed", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 14 and 0.0 <= out["accuracy"] <= 1.0
    assert set(out["per_kind"]) == {"color", "shape", "size", "count", "position", "yesno",
                                    "caption", "box"}


def test_demo_accuracy_500_questions():
    """The issue's bar, on the default seed: >= 0.97 overall, >= 0.90 per kind.
    About 15 s on 2 cores, so it runs in CI (it was `slow` when the eval took minutes)."""
    r = _eval("--model", "demo", "--n", "500", "--json", timeout=1800)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["accuracy"] >= 0.97, out
    assert min(out["per_kind"].values()) >= 0.90, out["per_kind"]


@pytest.mark.parametrize("case", ["missing", "no_config", "n0", "negative", "neither",
                                  "torch_on_trt"])
def test_vlm_eval_bad_input_is_one_line(case, tmp_path):
    if case == "torch_on_trt":  # --provider is where an artifact runs
        args = ["--model", "demo", "--provider", "trt"]
    elif case == "missing":
        args = ["--model", tmp_path / "nope"]
    elif case == "no_config":
        args = ["--model", tmp_path]
    elif case == "n0":
        args = ["--model", "demo", "--n", "0"]
    elif case == "negative":
        args = ["--model", "demo", "--n", "-3"]
    else:
        args = []
    r = _eval(*args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-eval: error:"), r.stderr
    if case == "torch_on_trt":
        assert "--provider" in lines[0]


def test_vlm_eval_runs_an_artifact_where_asked(demo_artifact):
    """--provider: cpu answers; an unknown one, or one this onnxruntime lacks,
    is one line naming what it has."""
    r = _eval(demo_artifact, "--n", "8", "--provider", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["system"] == "onnx-fp32" and out["providers"] == ["CPUExecutionProvider"]
    import onnxruntime as ort

    cases = [("tpu", "unknown provider 'tpu'")]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases.append(("cuda", "CUDAExecutionProvider"))
    for provider, words in cases:
        r = _eval(demo_artifact, "--n", "8", "--provider", provider)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and words in lines[0], r.stderr


def test_train_smoke(tmp_path):
    """demo/train.py runs a few steps on the tiny config and writes a model
    directory that loads back and generates."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmedge.demo import scenes, train

    out = tmp_path / "tiny"
    assert train.main(["--size", "tiny", "--steps", "3", "--vision-steps", "3", "--batch", "4",
                       "--out", str(out), "--log-every", "1"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "describe the image."}]}],
        add_generation_prompt=True)
    inputs = proc(images=scenes.make_scene(1).image, text=text, return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_token_targets_put_counts_on_the_summary_token_only():
    """Row 0 is CLIP's class token (the summary): counts, no colour/shape/size,
    no row/column and no box; rows 1..16 are the grid cells, objects (and
    their boxes, as the answer's coordinate classes) in theirs."""
    from vlmedge.demo import scenes, train

    scene = next(s for s in map(scenes.make_scene, range(100)) if len(s.objects) == 3)
    t = train.cell_targets(scene)
    assert t.shape == (17, 12)
    sizes = [o.size for o in scene.objects]
    assert list(t[0]) == [0, 0, 0, train.IGNORE, train.IGNORE, 3, sizes.count("small"),
                          sizes.count("large")] + [train.IGNORE] * 4
    assert (t[1:, 5:8] == train.IGNORE).all()
    occupied = {1 + o.row * scenes.GRID + o.col: o for o in scene.objects}
    for i in range(1, 17):
        assert (t[i, 1] > 0) == (i in occupied)
        assert (t[i, 3], t[i, 4]) == divmod(i - 1, scenes.GRID)
        if i in occupied:  # k of each coordinate word k / BOX_STEPS of the box answer
            box = scenes.read_box(scenes.box_text(occupied[i].box))
            want = [round(v / scenes.IMAGE_SIZE * scenes.BOX_STEPS) for v in box]
            assert list(t[i, 8:]) == want
        else:
            assert (t[i, 8:] == train.IGNORE).all()


def test_count_questions_route_to_the_summary_token():
    from vlmedge.demo import build, scenes, train

    scene = scenes.make_scene(3)
    q = scenes.Question("count", "how many large shapes are there?", "one")
    turn = train.Turn.of(scene, q)
    assert turn.cell == train.SUMMARY
    assert turn.word_ids == {build.vocab()["large"]}
    assert train.Turn.of(scene, q, count_route=False).cell == -1


def test_training_batches_are_the_same_with_a_data_worker():
    """The worker draws the joint batches from a copy of the warm-up's
    generator: the stream (and so the trained model) does not depend on it."""
    import argparse

    import torch

    from vlmedge.demo import train

    def stream(workers):
        args = argparse.Namespace(seed=5, vision_steps=2, steps=3, batch=3, turns=3,
                                  count_route=1, data_workers=workers, kind_weight=[])
        return list(train.batches(args))

    a, b = stream(0), stream(1)
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert not torch.equal(a[2][0], a[3][0])  # batches differ from one step to the next


def test_demo_processor_expands_the_image_to_the_models_token_count(demo_dir):
    from transformers import AutoConfig, AutoProcessor

    from vlmedge.demo import build, scenes

    cfg = AutoConfig.from_pretrained(demo_dir)
    proc = AutoProcessor.from_pretrained(demo_dir)
    ids = proc(images=scenes.make_scene(1).image, text="<user> <image> describe the image. <end>",
               return_tensors="np")["input_ids"]
    assert (ids == cfg.image_token_id).sum() == cfg.image_seq_length == build.NUM_IMAGE_TOKENS == 17
    assert cfg.vision_feature_select_strategy == build.SELECT_STRATEGY == "full"
