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
    result = scene_eval.evaluate(answerer, n=28, seed=3)  # 4 of each kind, unseen scenes
    assert result["accuracy"] >= 0.85, result["wrong"]


def test_vlm_eval_json_contract():
    r = _eval("--model", "demo", "--n", "14", "--seed", "5", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n"] == 14 and 0.0 <= out["accuracy"] <= 1.0
    assert set(out["per_kind"]) == {"color", "shape", "size", "count", "position", "yesno",
                                    "caption"}


@pytest.mark.slow
def test_demo_accuracy_500_questions():
    r = _eval("--model", "demo", "--n", "500", "--json", timeout=1800)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["accuracy"] >= 0.97, out
    assert min(out["per_kind"].values()) >= 0.90, out["per_kind"]


@pytest.mark.parametrize("case", ["missing", "no_config", "n0", "negative", "neither"])
def test_vlm_eval_bad_input_is_one_line(case, tmp_path):
    if case == "missing":
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


def test_train_smoke(tmp_path):
    """demo/train.py runs a few steps on the tiny config and writes a model
    directory that loads back and generates."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmedge.demo import scenes, train

    out = tmp_path / "tiny"
    assert train.main(["--size", "tiny", "--steps", "3", "--batch", "4", "--out", str(out),
                       "--log-every", "1"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "describe the image."}]}],
        add_generation_prompt=True)
    inputs = proc(images=scenes.make_scene(1).image, text=text, return_tensors="pt")
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]
