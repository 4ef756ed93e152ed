"""Parity of a candidate artifact (TensorRT engines) against a reference on
onnxruntime's CPU provider (the fp32 export, or the candidate's own graphs:
gpu_check.sh's int4-fp16 step), for benchmarks/gpu_check.sh:

    python -m vlmedge.benchmarks.trt_parity CANDIDATE REFERENCE --provider trt [--accuracy-n 200]

1. First-step logits on a few demo scenes (same image, same question, same
   prompt ids): max |delta logits| <= tol, where tol = abs_tol + rel_tol * max|ref logits|
   (fp16 rounds to 11-bit mantissas; random-weight presets have other scales),
   and the greedy first token agrees on at least `min_agree` of them.
2. With --accuracy-n: scene-world accuracy of both (vlm-eval's questions, same n
   and seed); the candidate may lose at most --max-drop points.

Exit status 1 when a check fails; the JSON on stdout has every figure.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from vlmedge.errors import cli_errors
from vlmedge.runtime.cli_common import make_app

app = make_app("Compare a TensorRT artifact with a reference on onnxruntime's CPU provider: "
               "first-step logits on demo scenes and, optionally, scene-world accuracy.")

QUESTION = "what color is the circle?"


def first_step_logits(session, image) -> np.ndarray:
    """Logits (V,) after prefilling `image` + QUESTION (no sampling involved)."""
    pixels, grid = session.preprocess(image)
    ids = session.chat.prompt_ids(QUESTION, image_grid=grid)
    logits, _ = session.prefill(ids, session.encode_image(pixels, grid), session.empty_cache(),
                                grid)
    return np.asarray(logits, np.float32)


def logits_parity(candidate, reference, scenes_n: int, abs_tol: float, rel_tol: float,
                  min_agree: float) -> dict:
    from vlmedge.demo import scenes

    diffs, agree, scale = [], 0, 0.0
    for k in range(scenes_n):
        image = scenes.make_scene(scenes.EVAL_SEED_BASE + 900 + k).image
        c, r = first_step_logits(candidate, image), first_step_logits(reference, image)
        diffs.append(float(np.abs(c - r).max()))
        agree += int(c.argmax() == r.argmax())
        scale = max(scale, float(np.abs(r).max()))
    tol = abs_tol + rel_tol * scale
    return {"max_abs_diff_logits": max(diffs), "tolerance": tol, "max_abs_ref_logit": scale,
            "first_token_agreement": agree / scenes_n,
            "passed": max(diffs) <= tol and agree / scenes_n >= min_agree}


@app.command()
def main(
    candidate: Path = typer.Argument(..., help="Artifact to check (with engines: --provider "
                                               "trt)."),
    reference: Path = typer.Argument(..., help="Reference artifact, run on onnxruntime's CPU."),
    provider: str = typer.Option("trt", "--provider", help="Candidate provider: trt | cuda | cpu."),
    scenes_n: int = typer.Option(8, "--scenes", help="Demo scenes for the logits check."),
    abs_tol: float = typer.Option(0.1, "--abs-tol", help="Absolute logits tolerance."),
    rel_tol: float = typer.Option(0.02, "--rel-tol", help="Tolerance per unit of max |ref logit|."),
    min_agree: float = typer.Option(0.875, "--min-agree",
                                    help="Least share of scenes whose greedy first token agrees."),
    accuracy_n: int = typer.Option(0, "--accuracy-n",
                                   help="Scene questions for the accuracy check (0: skip)."),
    max_drop: float = typer.Option(1.0, "--max-drop", help="Most accuracy points the candidate "
                                                            "may lose."),
    threads: int = typer.Option(0, "--threads", help="Reference CPU threads (0: default)."),
) -> None:
    with cli_errors("trt_parity"):
        from vlmedge.runtime import VLMSession

        cand = VLMSession(candidate, provider=provider)
        ref = VLMSession(reference, provider="cpu", threads=threads or None)
        out = {"candidate": str(candidate), "reference": str(reference),
               "candidate_providers": list(cand.providers),
               "logits": logits_parity(cand, ref, scenes_n, abs_tol, rel_tol, min_agree)}
        passed = out["logits"]["passed"]
        if accuracy_n:
            from vlmedge.benchmarks import scene_eval

            def answer(session):
                return lambda image, q: session.generate(image, q, max_new_tokens=24).text
            acc_c = scene_eval.evaluate(answer(cand), accuracy_n, 0)["accuracy"]
            acc_r = scene_eval.evaluate(answer(ref), accuracy_n, 0)["accuracy"]
            drop = 100.0 * (acc_r - acc_c)
            out["accuracy"] = {"n": accuracy_n, "candidate": acc_c, "reference": acc_r,
                               "drop_points": drop, "passed": drop <= max_drop}
            passed = passed and drop <= max_drop
        out["passed"] = passed
        print(json.dumps(out))
    if not passed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
