"""vlm-export: Hugging Face VLM directory -> artifact directory (placeholder)."""
from __future__ import annotations

import typer

from vlmedge.errors import VlmedgeError, cli_errors
from vlmedge.runtime.cli_common import make_app

app = make_app("Export a Hugging Face vision-language model to ONNX / TensorRT.")


@app.command()
def main(model: str = typer.Option("demo", "--model")) -> None:
    with cli_errors("vlm-export"):
        raise VlmedgeError("vlm-export is not implemented yet")
