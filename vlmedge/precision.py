"""An artifact's precision as one typed value (the manifest's `precision` names it).

What a precision means is decided here once, for the exporter (which stages run,
which flavours and targets take it), the runtime (the graphs' float dtype) and
the manifest (the allowed names), instead of string comparisons in each.

    name          io_dtype  decoder weights        gate  static  cpu_only  trt  flavours
    fp32          float32   fp32                   -     -       no        no   portable, ort
    fp16          float16   fp16                   -     -       no        yes  portable
    int8          float32   int8 QDQ / MatMulNBits yes   yes     no        yes  portable, ort
    int8-dynamic  float32   int8 MatMulInteger     yes   no      yes       no   portable
    int4          float32   int4 weight-only       yes   -       no        no   ort, portable
    int4-fp16     float16   int4 weight-only       yes   -       no        yes  portable

(int8 with the ort flavour is weight-only MatMulNBits, export/weight_only.py;
with the portable flavour static QDQ, calibration/int8.py. int4 with the ort
flavour is MatMulNBits; with the portable flavour opset-21 DequantizeLinear of
int4 blocks before each MatMul, standard ONNX that onnxruntime fuses back into
MatMulNBits at load. int4-fp16 is that portable graph with fp16 scales and
fp16 activations everywhere (W4A16): TensorRT's weight-only INT4, whose
blocks are 64 or 128 weights, and GPUs' fp16 arithmetic.)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str
    io_dtype: str  # the graphs' float inputs/outputs: "float32" | "float16"
    weights: str  # how the decoder's weights are stored, in words
    calibrated: bool  # held to an accuracy gate on calibration data
    static: bool | None  # int8 activations: static ranges (QDQ) or dynamic; None: n/a
    cpu_only: bool  # graphs only onnxruntime's CPU provider runs
    trt: bool  # --target trt takes it (TensorRT engines)
    flavours: tuple[str, ...]  # decoder flavours that take it; the first is the default
    # parity with PyTorch: "fp32" (the family's tolerances), "fp16" (its fp16 ones),
    # or None: the quantized graphs are gated for accuracy instead, after fp32 parity
    parity: str | None


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", "fp32", False, None, False, False, ("portable", "ort"), "fp32"),
    Precision("fp16", "float16", "fp16", False, None, False, True, ("portable",), "fp16"),
    Precision("int8", "float32", "int8 (QDQ portable, MatMulNBits ort)", True, True, False, True,
              ("portable", "ort"), None),
    Precision("int8-dynamic", "float32", "int8 MatMulInteger", True, False, True, False,
              ("portable",), None),
    Precision("int4", "float32", "int4 weight-only, block 32", True, None, False, False,
              ("ort", "portable"), None),
    Precision("int4-fp16", "float16", "int4 weight-only, block 128 or 64, fp16 activations", True,
              None, False, True, ("portable",), None),
)}
NAMES = tuple(PRECISIONS)


def get(name: str) -> Precision:
    """The Precision named `name` (KeyError for an unknown one: callers say
    what was expected, in their own words)."""
    return PRECISIONS[name]
