"""vlm-eval: scene-world accuracy of the PyTorch model or of an exported artifact."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from vlmedge.errors import UserInputError, cli_errors
from vlmedge.models import resolve_model_dir
from vlmedge.runtime.cli_common import Progress, make_app, positive

app = make_app(
    "Ask the demo scene world's held-out questions and report exact-match accuracy, "
    "overall and per question kind.\n\n"
    "Give --model (a Hugging Face model directory, or 'demo') to run the PyTorch model, "
    "or an ARTIFACT_DIR written by vlm-export to run it through the vlmedge runtime. "
    "The same --n and --seed ask the same questions, so the two compare on identical inputs.")


@app.command()
def main(
    artifact_dir: Optional[Path] = typer.Argument(
        None, help="An artifact directory from vlm-export (runs through the runtime)."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Hugging Face model directory, or 'demo' (runs PyTorch)."),
    n: int = typer.Option(200, "--n", help="Number of held-out questions."),
    seed: int = typer.Option(0, "--seed", help="Evaluation seed (disjoint from training)."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens"),
    threads: int = typer.Option(0, "--threads", help="CPU threads (0: library default)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object to stdout."),
    decoder_flavour: Optional[str] = typer.Option(
        None, "--decoder-flavour", help="portable | ort: which decoder of an artifact exported "
        "with --decoder-flavour both (default: ort on the CPU provider, portable elsewhere)."),
    provider: str = typer.Option(
        "cpu", "--provider", help="Where an artifact runs: cpu | cuda | trt | auto (trt: the "
        "engines built on this device; measure a GPU export where it deploys)."),
) -> None:
    with cli_errors("vlm-eval"):
        positive("--n", n)
        positive("--max-new-tokens", max_new_tokens)
        if seed < 0:
            raise UserInputError("--seed must be >= 0", got=str(seed))
        if model is not None and decoder_flavour is not None:
            raise UserInputError("--decoder-flavour chooses an artifact's decoder",
                                 got="--model", hint="give an ARTIFACT_DIR with it")
        if model is not None and provider != "cpu":
            raise UserInputError("--provider chooses where an artifact runs",
                                 got=f"--model with --provider {provider}",
                                 hint="give an ARTIFACT_DIR with it; --model runs PyTorch on "
                                      "the CPU")
        if (artifact_dir is None) == (model is None):
            raise UserInputError("give exactly one of ARTIFACT_DIR or --model",
                                 got="both" if model else "neither",
                                 hint="vlm-eval --model demo, or vlm-eval ./demo-onnx-fp32")
        from vlmedge.benchmarks import scene_eval
        if model is not None:
            from vlmedge.benchmarks.torch_answerer import TorchAnswerer
            answerer = TorchAnswerer(resolve_model_dir(model), max_new_tokens, threads or None)
            system = "torch-eager-fp32"
        else:
            from vlmedge.benchmarks.runtime_answerer import RuntimeAnswerer
            answerer = RuntimeAnswerer(artifact_dir, max_new_tokens, threads or None,
                                       provider=provider, decoder_flavour=decoder_flavour)
            system = answerer.system_name
        with Progress(f"vlm-eval {system}", n, quiet=False) as bar:
            result = scene_eval.evaluate(answerer, n, seed, progress=bar.update)
        result = {"system": system, **result}
        if model is None:  # where the artifact ran (cpu, cuda or native TensorRT engines)
            result["providers"] = list(answerer.session.providers)
        if as_json:
            print(json.dumps(result))
            return
        print(f"{system}: accuracy {result['accuracy']:.3f} on {n} questions (seed {seed}), "
              f"{result['seconds']:.1f}s")
        for kind, acc in result["per_kind"].items():
            print(f"  {kind:9s} {acc:.3f}  (n={result['per_kind_n'][kind]})")
        for w in result["wrong"][:5]:
            print(f"  wrong: {w['question']!r} expected {w['expected']!r} got {w['got']!r}",
                  file=sys.stderr)


if __name__ == "__main__":
    app()
