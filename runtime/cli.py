"""vlm-run: answer questions about an image with an exported artifact."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from vlmedge.errors import UserInputError, cli_errors
from vlmedge.runtime.cli_common import make_app

app = make_app(
    "Answer questions about an image with an artifact directory from vlm-export, through "
    "the lean runtime (onnxruntime + C preprocessing; no torch). Streams the answer by "
    "default.\n\n"
    "Examples:\n\n"
    "  vlm-run demo-onnx-fp32                      # bundled scene image, default question\n\n"
    "  vlm-run ART --image frame.jpg --prompt 'what color is the circle?' --prompt 'describe the image.'\n\n"
    "  vlm-run ART --image frame.jpg --json        # text + per-stage timings\n\n"
    "  vlm-run ART --image a.jpg --image b.jpg --prompt 'is <image> the same room as <image>?'")

DEFAULT_QUESTION = "describe the image."


@app.command()
def main(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory written by vlm-export."),
    image: Optional[List[Path]] = typer.Option(
        None, "--image", "-i", help="Image file (JPEG/PNG/...); default: the bundled demo scene. "
        "Repeat for several images in one prompt (each --prompt is about all of them): they "
        "go at the prompt's <image> markers, one per image, else all first. LLaVA, "
        "Idefics3/SmolVLM, Qwen2/2.5/3-VL, LLaVA-NeXT/OneVision, InternVL, Gemma 3 and "
        "PaliGemma take several (up to 16)."),
    prompt: Optional[List[str]] = typer.Option(
        None, "--prompt", "-p", help="Question; repeat for several (images encoded once)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Makes sampling repeatable."),
    provider: str = typer.Option("auto", "--provider", help="auto | cpu | cuda | trt"),
    threads: int = typer.Option(0, "--threads", help="CPU threads per graph (0: default)."),
    decoder_flavour: Optional[str] = typer.Option(
        None, "--decoder-flavour", help="portable | ort: which decoder graph of an artifact "
        "exported with --decoder-flavour both (default: ort on the CPU provider, portable "
        "elsewhere, CUDA included)."),
    max_image_tokens: Optional[int] = typer.Option(
        None, "--max-image-tokens", help="Image-token budget: SmolVLM tiles / Qwen2-VL pixels "
        "scaled so the image takes at most this many tokens (less vision and prefill time)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print tokens as they come."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text + timings)."),
    choices: Optional[str] = typer.Option(
        None, "--choices", help="Comma-separated answers, e.g. yes,no: the answer is exactly "
        "one of them (constrained decoding)."),
    json_schema: Optional[str] = typer.Option(
        None, "--json-schema", help="A JSON schema (a file, or the schema's JSON text): the "
        "answer is JSON matching it (needs llguidance: pip install 'vlmedge[structured]')."),
    annotate: Optional[Path] = typer.Option(
        None, "--annotate", help="Write a PNG of the image with the boxes the (first) "
        "prompt's answer grounds drawn on it (Qwen2-VL, Qwen2.5-VL, InternVL conventions; "
        "one --image). With --json the boxes are in the JSON anyway."),
) -> None:
    with cli_errors("vlm-run"):
        from vlmedge.runtime import VLMSession

        from vlmedge.models import demo_image

        if threads < 0:
            raise UserInputError("--threads must be >= 0", got=str(threads),
                                 hint="0 uses onnxruntime's default")
        paths = image or [demo_image()]
        for path in paths:
            if not path.is_file():
                raise UserInputError(f"image {path} does not exist or is not a file")
        if annotate is not None and len(paths) != 1:
            raise UserInputError("--annotate draws on one image", got=f"{len(paths)} --image",
                                 hint="pass one --image")
        questions = prompt or [DEFAULT_QUESTION]
        structured = structured_options(choices, json_schema)
        session = VLMSession(artifact_dir, provider=provider, threads=threads or None,
                             allow_fallback=provider == "auto",
                             max_image_tokens=max_image_tokens, decoder_flavour=decoder_flavour)
        if annotate is not None:
            _check_grounding(session.manifest.family)
        opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, seed=seed, **structured)
        session.chat.check_image_count(len(paths))  # too many: refused before any work
        # Each image encoded once, whatever the number of questions; one image
        # goes alone (its prompt prefix's KV cache is reused across questions).
        encoded = [session.encode(p, several=len(paths) > 1) for p in paths]
        image = encoded[0] if len(encoded) == 1 else encoded
        if as_json:
            results = [session.generate(image, q, **opts).to_dict() for q in questions]
            for q, r in zip(questions, results):
                r["prompt"] = q
                r["decoder_flavour"] = session.decoder_flavour
            if annotate is not None:
                _annotate(paths[0], results[0]["boxes"], annotate)
            print(json.dumps(results[0] if len(results) == 1 else {"results": results}))
            return
        for i, q in enumerate(questions):
            if len(questions) > 1:
                print(f"Q: {q}")
            if stream and not (annotate is not None and i == 0):  # boxes need the whole answer
                for piece in session.stream(image, q, **opts):
                    print(piece, end="", flush=True)
                print(flush=True)
                t = session.last_timings
            else:
                r = session.generate(image, q, **opts)
                print(r.text, flush=True)
                t = r.timings
                if annotate is not None and i == 0:
                    _annotate(paths[0], [b.to_dict() for b in r.boxes], annotate)
            print(_timing_line(t), file=sys.stderr)


def structured_options(choices: str | None, json_schema: str | None) -> dict:
    """--choices a,b and --json-schema FILE|JSON -> generate()'s keyword arguments."""
    out: dict = {}
    if choices is not None:
        out["choices"] = [c.strip() for c in choices.split(",") if c.strip()]
        if not out["choices"]:
            raise UserInputError("--choices needs comma-separated answers", got=repr(choices))
    if json_schema is not None:
        text = json_schema
        path = Path(json_schema)
        if not json_schema.lstrip().startswith("{") and path.is_file():
            text = path.read_text()
        try:
            out["json_schema"] = json.loads(text)
        except ValueError as e:
            raise UserInputError("--json-schema is neither a JSON file nor JSON text",
                                 got=f"{str(e)[:80]}") from None
    return out


def _check_grounding(family: str) -> None:
    """One line, before any work, where the family has no box convention."""
    from vlmedge.runtime.grounding import convention_for
    if convention_for(family) is None:
        raise UserInputError("--annotate: this model's answers carry no boxes vlmedge can read",
                             got=f"family {family}", hint="Qwen2-VL, Qwen2.5-VL, Qwen3-VL, "
                             "InternVL, PaliGemma and LLaVA (the demo) artifacts answer with boxes")


def _annotate(image_path: Path, boxes: list[dict], out: Path) -> None:
    """Draw the answer's boxes (Box.to_dict()s) on the image, write the PNG."""
    from vlmedge.runtime.grounding import Box, draw_boxes
    try:
        draw_boxes(image_path, [Box(**b) for b in boxes], out)
    except OSError as e:
        raise UserInputError(f"--annotate could not write {out}", got=str(e)[:120]) from None
    print(f"vlm-run: {len(boxes)} box(es) drawn to {out}", file=sys.stderr)


def _timing_line(t: dict) -> str:
    # A question after the first about the same image reuses its encoding
    # and prompt prefix: its preprocess/vision were paid once, by the first.
    stages = ("prefill_ms", "ttft_ms") if t.get("prefix_reused") else \
        ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms")
    parts = [f"{k.replace('_ms', '')} {t[k]:.1f} ms" for k in stages if k in t]
    if t.get("prefix_reused"):
        parts.insert(0, "image reused")
    parts.append(f"decode {t.get('tokens_per_s', 0):.1f} tok/s over {len(t.get('decode_ms', []))}")
    return "[" + ", ".join(parts) + "]"
