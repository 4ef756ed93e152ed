"""vlm-serve: an OpenAI-compatible server (chat completions, streaming, a
browser page) for one artifact, on uvicorn."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from vlmedge.errors import UserInputError, cli_errors
from vlmedge.runtime.cli_common import make_app

app = make_app(
    "Serve an artifact from vlm-export over HTTP with the OpenAI chat API "
    "(POST /v1/chat/completions, streaming, image_url data: URLs), GET /v1/models, /health, "
    "/metrics (Prometheus) and a browser page at /. Binds to 127.0.0.1 unless told otherwise. "
    "Needs the serve extra: pip install 'vlmedge[serve]'.\n\n"
    "Examples:\n\n"
    "  vlm-serve demo-onnx-fp32                       # http://127.0.0.1:8000/\n\n"
    "  vlm-serve ART --workers 2 --api-key $KEY --port 9000")


@app.command()
def main(
    artifact_dir: Path = typer.Argument(..., help="Artifact directory written by vlm-export."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes it "
                             "on every interface: set --api-key then)."),
    port: int = typer.Option(8000, "--port"),
    workers: int = typer.Option(1, "--workers", help="Sessions answering in parallel."),
    queue_size: int = typer.Option(16, "--queue-size", help="Requests waiting at most; more "
                                   "are answered 429 with Retry-After."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds a request may take."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="VLMEDGE_API_KEY",
                                          help="Require Authorization: Bearer KEY."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="Fetch http(s) image URLs."),
    allow_dir: Optional[List[Path]] = typer.Option(
        None, "--allow-dir", help="Serve local image paths under this folder (repeatable)."),
    max_body_mb: float = typer.Option(20.0, "--max-body-mb"),
    max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image, pixels."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Default max_tokens."),
    threads: int = typer.Option(0, "--threads", help="CPU threads per graph (0: default)."),
    provider: str = typer.Option("auto", "--provider", help="auto | cpu | cuda | trt"),
    ray: bool = typer.Option(False, "--ray", help="Serve as a Ray Serve application "
                             "(pip install 'ray[serve]'): --replicas copies behind Ray's proxy."),
    replicas: int = typer.Option(2, "--replicas", help="--ray: replicas of the app."),
    ray_address: Optional[str] = typer.Option(
        None, "--ray-address", help="--ray: the cluster to join (default: start a local one)."),
) -> None:
    with cli_errors("vlm-serve"):
        for name, v in (("--workers", workers), ("--queue-size", queue_size),
                        ("--port", port), ("--max-tokens", max_tokens)):
            if v < 1:
                raise UserInputError(f"{name} must be >= 1", got=str(v))
        if timeout <= 0 or max_body_mb <= 0 or max_pixels < 1 or threads < 0:
            raise UserInputError("--timeout, --max-body-mb and --max-pixels must be positive, "
                                 "--threads >= 0")
        for d in allow_dir or []:
            if not d.is_dir():
                raise UserInputError(f"--allow-dir {d} is not a folder")
        if ray:
            _serve_on_ray(artifact_dir, host, port, replicas, ray_address, workers=workers,
                          queue_size=queue_size, timeout_s=timeout, api_key=api_key,
                          threads=threads or None, provider=provider)
            return
        uvicorn = _uvicorn()
        from .app import ServeOptions, create_app

        opts = ServeOptions(workers=workers, queue_size=queue_size, timeout_s=timeout,
                            api_key=api_key, allow_remote_images=allow_remote_images,
                            allow_dirs=list(allow_dir or []),
                            max_body_bytes=int(max_body_mb * 2**20), max_pixels=max_pixels,
                            default_max_tokens=max_tokens, threads=threads or None,
                            provider=provider)
        application = create_app(artifact_dir, opts)
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            print(f"vlm-serve: warning: serving on {host} without --api-key", file=sys.stderr)
        print(f"vlm-serve: http://{host}:{port}/ ({workers} worker(s))", file=sys.stderr)
        uvicorn.run(application, host=host, port=port, log_level="warning")


def _serve_on_ray(artifact: Path, host: str, port: int, replicas: int, address: str | None,
                  **options) -> None:
    import time

    from vlmedge.lazy import require

    from .ray_app import application

    if replicas < 1:
        raise UserInputError("--replicas must be >= 1", got=str(replicas))
    if not (artifact / "manifest.json").is_file():
        raise UserInputError(f"{artifact} is not an artifact directory (no manifest.json)")
    ray = require("ray", "vlm-serve --ray (pip install 'ray[serve]')")
    serve = require("ray.serve", "vlm-serve --ray (pip install 'ray[serve]')")
    ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(str(artifact.resolve()), replicas, **options), route_prefix="/")
    print(f"vlm-serve: http://{host}:{port}/ ({replicas} Ray Serve replica(s)); Ctrl-C stops",
          file=sys.stderr)
    try:
        while True:
            time.sleep(1)
    finally:
        serve.shutdown()
        ray.shutdown()


def _uvicorn():
    from vlmedge.lazy import require
    return require("uvicorn", "vlm-serve (pip install 'vlmedge[serve]')")


if __name__ == "__main__":
    app()
