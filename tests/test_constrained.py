"""Structured answers (runtime/constrained.py): choices on the trained demo
model, JSON schemas through llguidance on a tiny model with a byte-level BPE
tokenizer, in the API and in vlm-run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlmedge.demo import scenes
from vlmedge.errors import IncompleteAnswerError, UserInputError


def _bin(name):
    return str(Path(sys.executable).parent / name)


@pytest.fixture(scope="module")
def demo(demo_artifact):
    from vlmedge.runtime import VLMSession
    return VLMSession(demo_artifact, provider="cpu", threads=1)


def _yes_no_questions(n):
    out = []
    for i in range(n):
        scene = scenes.make_scene(scenes.EVAL_SEED_BASE + 900 + i)
        out += [(scene, q) for q in scenes.questions(scene) if q.kind == "yesno"]
    return out


def test_choices_answer_is_one_of_them_and_right(demo):
    cases = _yes_no_questions(12)
    assert len(cases) >= 10
    right = 0
    for scene, q in cases:
        r = demo.generate(scene.image, q.question, choices=["yes", "no"])
        assert r.value in ("yes", "no") and r.text.strip() == r.value
        right += r.value == q.answer
    assert right / len(cases) >= 0.9  # the demo model answers yes/no at ~0.99


def test_choices_force_the_answer_space(demo):
    """Asked to describe, the unconstrained answer is a caption; constrained,
    it is one of the choices (multi-word choices included)."""
    scene = scenes.make_scene(scenes.EVAL_SEED_BASE + 31)
    free = demo.generate(scene.image, "describe the image.").text
    options = ["yes", "no", "a red square and a blue circle"]
    r = demo.generate(scene.image, "describe the image.", choices=options)
    assert free not in options and r.value in options
    colors = ["red", "green", "blue", "yellow", "purple", "white"]
    q = "what color is the " + scene.objects[0].shape + "?"
    assert demo.generate(scene.image, q, choices=colors).value == demo.generate(scene.image,
                                                                                q).text


def test_choices_cut_by_max_new_tokens_say_so(demo):
    with pytest.raises(IncompleteAnswerError, match="max_new_tokens=2"):
        demo.generate(scenes.make_scene(1).image, "describe the image.",
                      choices=["a red square and a blue circle"], max_new_tokens=2)


@pytest.mark.parametrize("choices, match", [
    ([], "non-empty list"), ("yes", "non-empty list"), (["yes", ""], "non-empty string"),
    (["banana"], "cannot be written"), ([3], "non-empty string")])
def test_bad_choices_are_one_line(demo, choices, match):
    with pytest.raises(UserInputError, match=match):
        demo.generate(scenes.make_scene(1).image, "is there a red square?", choices=choices)


def test_json_schema_needs_a_tokenizer_llguidance_reads(demo):
    with pytest.raises(UserInputError, match="byte-level BPE"):
        demo.generate(scenes.make_scene(1).image, "x", json_schema={"type": "object"})


def test_stream_with_choices(demo):
    scene = scenes.make_scene(5)
    pieces = list(demo.stream(scene.image, "is there a red square?", choices=["yes", "no"]))
    assert "".join(pieces).strip() in ("yes", "no")


# -- JSON schema: a tiny random model with a byte-level BPE tokenizer ----------------------

SPECIAL = ["<pad>", "<unk>", "<s>", "<end>", "<user>", "<assistant>", "<image>"]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "count"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "count": {"type": "integer", "minimum": 0, "maximum": 9}}}


@pytest.fixture(scope="module")
def bpe_artifact(tmp_path_factory, demo_dir):
    """The tiny LLaVA with a byte-level BPE tokenizer (special tokens at the
    demo's ids), random weights, exported and validated."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (AutoProcessor, LlavaForConditionalGeneration,
                              PreTrainedTokenizerFast)

    from vlmedge.demo import build
    from vlmedge.export import exporter

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(scenes.vocabulary()), '{"color": "red", "count": 3}',
              '{"color":"blue","count":0}', "describe the image. what color is it?"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=330, special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert [tok.token_to_id(t) for t in SPECIAL] == list(range(len(SPECIAL)))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<end>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": "<image>"})
    proc = AutoProcessor.from_pretrained(demo_dir)
    proc.tokenizer = fast
    torch.manual_seed(0)
    cfg = build.make_config("tiny")
    cfg.text_config.vocab_size = tok.get_vocab_size()
    cfg.text_config.initializer_range = 0.2
    model = LlavaForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("bpe") / "model"
    build.save_model_dir(model, out)
    proc.save_pretrained(out)  # the BPE tokenizer over the demo's
    art = out.parent / "art"
    summary = exporter.run_export(exporter.ExportOptions(model_dir=out, output=art),
                                  log=lambda s: None)
    assert summary["validation"]["passed"], summary["validation"]
    return art


@pytest.fixture(scope="module")
def bpe(bpe_artifact):
    pytest.importorskip("llguidance")
    from vlmedge.runtime import VLMSession
    return VLMSession(bpe_artifact, provider="cpu", threads=1)


def _valid(value):
    return (isinstance(value, dict) and set(value) == {"color", "count"}
            and value["color"] in ("red", "green", "blue")
            and isinstance(value["count"], int) and 0 <= value["count"] <= 9)


def test_json_schema_answers_parse_and_match(bpe):
    """Random weights answer junk unconstrained; constrained, every answer is
    JSON that matches the schema, greedy and sampled."""
    for i in range(4):
        scene = scenes.make_scene(50 + i)
        free = bpe.generate(scene.image, "describe the image.", max_new_tokens=24).text
        r = bpe.generate(scene.image, "describe the image.", json_schema=SCHEMA,
                         max_new_tokens=40, temperature=1.0 if i % 2 else 0.0, seed=i)
        assert _valid(r.value), r.text
        assert json.loads(r.text) == r.value and r.stop_reason in ("stop_token",
                                                                     "constraint_complete")
        assert not _valid(_try_json(free))


def _try_json(text):
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_json_cut_by_max_new_tokens_says_so(bpe):
    with pytest.raises(IncompleteAnswerError, match="json_schema answer was cut"):
        bpe.generate(scenes.make_scene(3).image, "describe the image.", json_schema=SCHEMA,
                     max_new_tokens=3)


def test_choices_with_a_bpe_tokenizer(bpe):
    r = bpe.generate(scenes.make_scene(3).image, "is there a red square?",
                     choices=["yes", "no", "not sure"])
    assert r.value in ("yes", "no", "not sure")


def test_vlm_run_json_schema_and_choices(bpe_artifact, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    r = subprocess.run([_bin("vlm-run"), str(bpe_artifact), "--json-schema", str(schema),
                        "-n", "40", "--no-stream"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _valid(json.loads(r.stdout.strip()))
    r = subprocess.run([_bin("vlm-run"), str(bpe_artifact), "--choices", "yes,no", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and json.loads(r.stdout)["value"] in ("yes", "no"), r.stderr
    r = subprocess.run([_bin("vlm-run"), str(bpe_artifact), "--json-schema", "{not json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("vlm-run: error: --json-schema")
