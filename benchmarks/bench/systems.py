"""The systems under test, each a worker process (worker.py) driven from here.

    sys = SystemProcess(Spec("onnx-fp32", "onnx", path), threads=2)
    sys.start(); r = sys.run(image, prompt, 32); sys.memory(); sys.close()
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmedge import manifest as manifest_mod
from vlmedge.errors import ContextOverflowError, UserInputError, VlmedgeError
from vlmedge.models import resolve_model_dir

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerError(VlmedgeError):
    """A system's worker process failed (crashed, ran out of memory, ...)."""


@dataclass
class Spec:
    name: str  # backend and precision: torch-eager-fp32, onnx-fp32, onnx-int8, ort-int4, ...
    kind: str  # "torch" | "onnx" | a peer's: "genai" (onnxruntime-genai), "llamacpp" (peer.py)
    path: Path  # model directory (torch), artifact directory (onnx), peer model folder
    manifest: "manifest_mod.Manifest | None" = None
    random_weights: bool = False
    facts: dict[str, Any] = field(default_factory=dict)
    decoder_flavour: str | None = None  # onnx: the decoder graph run ("portable" | "ort")
    precision: str | None = None  # a peer's bit width (an artifact's is its manifest's)
    partner: str | None = None  # a peer's: the artifact system whose prompt length it takes


def system_name(m: "manifest_mod.Manifest", flavour: str) -> str:
    """What vlm-bench and vlm-eval call an artifact run with one decoder flavour.
    The ort flavour is its own system: ort-fp32, ort-int8, ort-int4; a
    weight-only block other than 32 (--weight-block-size) adds -b128 etc.; a
    weight-only export whose vision graph is int8 too (--vision-precision int8)
    adds -vint8: ort-int4-vint8, onnx-int4-b128-vint8 (portable int4)."""
    name = f"ort-{m.precision}" if flavour == "ort" else f"{m.target}-{m.precision}"
    block = (m.quantization.report.get("block_size") if m.quantization else None)
    if block not in (None, 32):
        name += f"-b{block}"
    if m.components["vision"].precision == "int8" and m.precision in ("int4", "int8") \
            and m.components[m.decoder_component(flavour)].precision.endswith("weight-only"):
        name += "-vint8"
    return name


def artifact_specs(dirs: list[Path], verify: bool = True) -> list[Spec]:
    """One Spec per artifact directory: the manifest read and, with verify,
    every file's sha256 checked here, once, before any timing (the workers
    then open the artifacts without re-hashing, so load time is the
    runtime's). Names say target and precision; a second artifact of the
    same kind gets its directory name added. An artifact holding both
    decoder flavours (--decoder-flavour both) is two systems, one per
    flavour, side by side in one run."""
    specs, seen = [], set()
    for d in dirs:
        m = manifest_mod.load(d, verify=verify)
        for flavour in m.decoder_flavours:
            name = system_name(m, flavour)
            if name in seen:
                name = f"{name}:{Path(d).name}"
            seen.add(name)
            specs.append(Spec(name, "onnx", Path(d), m, m.source.random_weights,
                              decoder_flavour=flavour))
    return specs


def torch_spec(model: str | None, first: Spec) -> Spec:
    """The PyTorch eager baseline: --model, else the first artifact's source
    model (random weights from its config.json if it was exported so)."""
    src = first.manifest.source
    random_weights = src.random_weights and model is None
    if model is None:
        path = Path(src.path)
        if not (path / "config.json").is_file():
            raise UserInputError(
                f"the baseline model {path} (the source of {first.path}) is not on this machine",
                hint="pass --model DIR (the Hugging Face model directory) or --model demo")
        model = str(path)
    path = resolve_model_dir(model)
    if not random_weights and not any(path.glob("*.safetensors")):
        random_weights = True  # a preset: config only, as exported with --random-weights
    return Spec("torch-eager-fp32", "torch", path, None, random_weights)


class SystemProcess:
    def __init__(self, spec: Spec, threads: int, provider: str = "cpu",
                 max_image_tokens: int | None = None):
        self.spec, self.threads, self.provider = spec, threads, provider
        self.max_image_tokens = max_image_tokens
        self.proc: subprocess.Popen | None = None
        self.ready: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> dict[str, Any]:
        env = dict(os.environ)
        for var in _THREAD_VARS:
            env[var] = str(self.threads)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlmedge.benchmarks.bench.worker"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env, text=True, bufsize=1)
        self._send({"kind": self.spec.kind, "path": str(self.spec.path), "threads": self.threads,
                    "provider": self.provider, "random_weights": self.spec.random_weights,
                    "max_image_tokens": self.max_image_tokens,
                    "decoder_flavour": self.spec.decoder_flavour})
        self.ready = self._receive()
        return self.ready

    def run(self, image: Path, prompt: str, new_tokens: int,
            prompt_tokens: int | None = None) -> dict[str, Any]:
        """prompt_tokens: the peer's prompt length (its partner's, image tokens included)."""
        self._send({"cmd": "run", "image": str(image), "prompt": prompt,
                    "new_tokens": new_tokens, "prompt_tokens": prompt_tokens})
        return self._receive()

    def memory(self) -> dict[str, Any]:
        self._send({"cmd": "memory"})
        return self._receive()

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self._send({"cmd": "quit"})
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, WorkerError):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def _send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._died()

    def _receive(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self._died()
        answer = json.loads(line)
        if "error" in answer:
            cls = ContextOverflowError if answer.get("type") == "ContextOverflowError" \
                else UserInputError
            raise cls(f"{self.name}: {answer['error']}")
        return answer

    def _died(self):
        code = self.proc.wait()
        how = "was killed (out of memory?)" if code in (-9, 137) else f"exited with status {code}"
        hint = "its messages are above on stderr"
        if self.spec.kind == "llamacpp" and code == -11:
            # seen on a Xeon with AMX: llama.cpp's AMX matmul on SmolVLM's 576-wide rows
            hint = ("llama.cpp crashed; on a CPU with AMX, build llama-cpp-python without its "
                    "AMX kernels: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON "
                    "-DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON' pip install "
                    "--no-cache-dir llama-cpp-python")
        raise WorkerError(f"the {self.name} worker process {how}", hint=hint)
