"""The portable decoder flavour's int4 weights: standard ONNX, blocked.

Each MatMul whose weight is a constant (the projections, the MLP, the LM head)
gets its weight as int4 blocks of `block_size` (BLOCK_SIZE unless
--weight-block-size) along the input axis, one fp32
scale per block (symmetric, round to nearest), and an opset-21
DequantizeLinear(axis 0, block_size) in front:

    W (K, N) fp32  ->  DequantizeLinear(W_q (K, N) int4, scales (K/32, N) fp32) -> MatMul

Standard ops, so every execution provider that implements opset-21
DequantizeLinear runs it; onnxruntime's CPU provider fuses each DQ + MatMul
pair back into its MatMulNBits kernel when the session loads (measured on
the demo decoder: 29 MatMulNBits in the optimized graph, no DequantizeLinear
left), so the portable graph decodes at the ort flavour's int4 speed without
its contrib ops in the file. Written by onnxruntime's MatMulNBitsQuantizer
in its QDQ format. The attention MatMuls (no constant weight) and the
embedding's Gather are left to the caller (the embedding is int8 per row).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from vlmedge.lazy import require

from . import ort_decoder
from .ort_decoder import quiet

BLOCK_SIZE = ort_decoder.BLOCK_SIZE  # as the ort flavour's MatMulNBits (llama.cpp q4_0's)


def quantize_decoder(tmp: Path, log: Callable[[str], None], block_size: int = BLOCK_SIZE) -> int:
    """tmp/decoder.onnx (+ .data) rewritten in place with int4 blocked weights;
    returns the number of MatMuls quantized."""
    onnx = require("onnx", "int4 weight quantization")
    require("onnxruntime", "int4 weight quantization")
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    model = onnx.load(str(tmp / "decoder.onnx"))
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True,
                                          quant_format=QuantFormat.QDQ,
                                          op_types_to_quantize=("MatMul",), bits=4)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                     quant_format=QuantFormat.QDQ, algo_config=config)
    # The quantizer logs a line per node at INFO, and warns that lifting the
    # graph to opset 21 "may not be a valid model": the gate checks the result
    # (weight_only.py), so one line of ours says what was done.
    with quiet(logging.ERROR):
        quantizer.process()
    out = quantizer.model.model
    n = sum(node.op_type == "DequantizeLinear" for node in out.graph.node)
    work = tmp / ".decoder-int4"
    work.mkdir(exist_ok=True)
    try:
        onnx.save(out, str(work / "decoder.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="decoder.onnx.data")
        for name in ("decoder.onnx", "decoder.onnx.data"):
            (work / name).replace(tmp / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[int4] {n} MatMul weights as int4 blocks of {block_size} (DequantizeLinear, opset 21)")
    return n
