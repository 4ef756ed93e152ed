"""Execution backends: one small interface, checks in the base, work in a
few methods (after Polygraphy's runners). No device is touched before
`open()`; the graphs' I/O contract comes from the manifest.

    backend = open_backend(path, provider="auto", threads=None)
    outputs = backend.run({"input_ids": ids})   # dict name -> np.ndarray
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from vlmedge.errors import ArtifactError, UserInputError
from vlmedge.lazy import require

PROVIDERS = ("auto", "cpu", "cuda", "trt")
_ORT_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


class Backend:
    """Runs one graph. Subclasses implement `_run`."""

    name = "base"

    def __init__(self, path: Path, input_names: list[str], output_names: list[str]):
        self.path = path
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:  # a runtime bug, not user input: name what is missing
            raise KeyError(f"{self.path.name}: missing inputs {missing}")
        return self._run(feeds)

    def _run(self, feeds):  # pragma: no cover - abstract
        raise NotImplementedError


def check_threads(threads) -> None:
    """None (onnxruntime's default) or a positive thread count."""
    if threads is None:
        return
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 1024:
        raise UserInputError("threads must be a positive integer (or None for the default)",
                             got=repr(threads)[:40])


def resolve_providers(provider: str, allow_fallback: bool = True) -> tuple[list[str], str | None]:
    """onnxruntime provider list for `provider`, and a note when it falls back.

    "auto" takes TensorRT EP, then CUDA, then CPU, as available; an explicit
    "cuda"/"trt" that is not available is an error unless allow_fallback, in
    which case CPU is used and the note says so."""
    if provider not in PROVIDERS:
        raise UserInputError(f"unknown provider {provider!r}", expected=" | ".join(PROVIDERS))
    ort = require("onnxruntime", "running an artifact")
    available = set(ort.get_available_providers())
    if provider == "auto":
        chain = [p for p in ("CUDAExecutionProvider",) if p in available]
        return chain + ["CPUExecutionProvider"], None
    wanted = _ORT_NAMES[provider]
    if wanted in available:
        return ([wanted] + (["CPUExecutionProvider"] if wanted != "CPUExecutionProvider" else [])), None
    if not allow_fallback:
        raise UserInputError(
            f"provider {provider!r} is not available in this onnxruntime",
            expected=wanted, got=", ".join(sorted(available)),
            hint="install onnxruntime-gpu (pip install 'vlmedge[gpu]'), or use --provider cpu")
    return ["CPUExecutionProvider"], (f"provider {provider!r} ({wanted}) is not available; "
                                      f"falling back to CPU")


class OrtBackend(Backend):
    """onnxruntime InferenceSession over one ONNX file."""

    name = "onnxruntime"

    def __init__(self, path: Path, providers: list[str], threads: int | None = None):
        ort = require("onnxruntime", "running an artifact")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The memory pattern reserves a fixed-shape graph's whole activation
        # plan as one block beside the arena that served the first run: 165 MB
        # (fp32) and 110 MB (int8) more peak on SmolVLM-256M's 512 px vision
        # tower, for no measurable speed on the CPU (the decoder's shapes
        # change every step, so it never had one).
        opts.enable_mem_pattern = providers[:1] != ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ArtifactError(f"onnxruntime cannot load {path.name}: {str(e).splitlines()[0]}",
                                hint="the file may be corrupt or need a newer onnxruntime") from None
        inputs = self.session.get_inputs()
        super().__init__(path, [i.name for i in inputs], [o.name for o in self.session.get_outputs()])
        # The graph's own input shapes: ints fixed, names/None dynamic.
        self.input_shapes = {i.name: list(i.shape) for i in inputs}
        self.providers = self.session.get_providers()
        # onnxruntime's error classes (none is exported as a base class)
        self._errors = tuple(
            c for c in vars(ort.capi.onnxruntime_pybind11_state).values()
            if isinstance(c, type) and issubclass(c, Exception))

    def _run(self, feeds):
        for name in self.input_names:
            want, got = self.input_shapes[name], feeds[name].shape
            if len(want) != len(got) or any(isinstance(w, int) and w != g
                                            for w, g in zip(want, got)):
                raise ArtifactError(
                    f"{self.path.name} takes {name} of shape {want}, and the artifact's "
                    f"preprocessing or manifest gave {list(got)}",
                    hint="the manifest disagrees with its graphs; re-export the artifact")
        try:
            outs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        except self._errors as e:  # a graph that fails on inputs of its declared shapes
            raise ArtifactError(f"onnxruntime failed running {self.path.name}: "
                                f"{str(e).strip().splitlines()[0][:200]}",
                                hint="the graph may be corrupt or not match its manifest; "
                                     "re-export the artifact") from None
        return dict(zip(self.output_names, outs))

    def run_bound(self, io) -> None:
        """Runs an IOBinding prepared by the caller (runtime/decoders.py binds
        the ort flavour's KV buffers as both input and output)."""
        try:
            self.session.run_with_iobinding(io)
        except self._errors as e:
            raise ArtifactError(f"onnxruntime failed running {self.path.name}: "
                                f"{str(e).strip().splitlines()[0][:200]}",
                                hint="the graph may be corrupt or not match its manifest; "
                                     "re-export the artifact") from None


def warn(msg: str) -> None:
    print(f"vlmedge: warning: {msg}", file=sys.stderr)
