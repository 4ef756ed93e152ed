"""vlm-run: answer questions about an image with an exported artifact (placeholder)."""
from __future__ import annotations

from pathlib import Path

import typer

from vlmedge.errors import VlmedgeError, cli_errors
from vlmedge.runtime.cli_common import make_app

app = make_app("Answer questions about an image with an artifact from vlm-export.")


@app.command()
def main(artifact_dir: Path = typer.Argument(...)) -> None:
    with cli_errors("vlm-run"):
        raise VlmedgeError("vlm-run is not implemented yet")
