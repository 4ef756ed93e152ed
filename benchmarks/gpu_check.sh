#!/usr/bin/env bash
# GPU check of the TensorRT target (issue 6), for a CUDA machine with TensorRT and
# cuda-python importable. Budget: under 10 minutes on one desktop GPU.
#
#   1. demo model: fp32 ONNX reference (validated against PyTorch), then
#      --target trt --precision fp16 (export builds the engines: TensorRT imports here),
#      check-trt, and parity against onnxruntime CPU: first-step logits within the
#      fp16 tolerance and scene accuracy within 1 point (benchmarks/trt_parity.py).
#   1b. demo model --target trt --precision int4-fp16 (TensorRT weight-only INT4):
#      engines built, then against the same graphs on onnxruntime CPU (which the
#      export's gate measured): logits within the fp16 tolerance, accuracy within 1 point.
#   2. SmolVLM-256M-shaped preset (random weights, benchmarks/presets/smolvlm-256m,
#      if present): the same export pair and the logits parity (no accuracy: random).
#   3. a short vlm-bench of the engines (provider auto picks native engines) if vlm-bench exists.
#
# Usage: benchmarks/gpu_check.sh [WORKDIR]     (default: a fresh temporary directory)
# Env:   MAX_CONTEXT (demo, default 512), PRESET_CONTEXT (default 1024), ACCURACY_N (200)
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="${1:-$(mktemp -d -t vlmedge-gpu-check-XXXX)}"
MAX_CONTEXT="${MAX_CONTEXT:-512}"
PRESET_CONTEXT="${PRESET_CONTEXT:-1024}"
ACCURACY_N="${ACCURACY_N:-200}"
BUDGET_S=600
mkdir -p "$WORK"
FAILED=0

step() { echo; echo "== [$(( SECONDS ))s] $*"; }
fail() { echo "FAIL: $*"; FAILED=1; }

step "preflight"
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader || fail "no nvidia-smi"
python - <<'EOF' || { echo "FAIL: tensorrt/cuda-python not importable; nothing to check"; exit 1; }
import tensorrt, numpy
from vlmedge.runtime import cuda_rt
cc, name = cuda_rt.device_facts()
print(f"TensorRT {tensorrt.__version__}; GPU {name}, compute capability {cc}")
EOF

# check_pair NAME MODEL CONTEXT EXTRA_EXPORT_ARGS... : fp32 reference + trt fp16 with engines
check_pair() {
    local name="$1" model="$2" ctx="$3"; shift 3
    step "$name: fp32 reference export (onnxruntime CPU)"
    vlm-export --model "$model" --precision fp32 --max-context "$ctx" --output "$WORK/$name-fp32" \
        --force "$@" > "$WORK/$name-fp32.log" 2>&1 || { fail "$name fp32 export"; tail -5 "$WORK/$name-fp32.log"; return; }
    step "$name: --target trt --precision fp16 (plan, check, build_engines.sh, engines)"
    vlm-export --model "$model" --target trt --precision fp16 --max-context "$ctx" \
        --output "$WORK/$name-trt-fp16" --force "$@" | tee "$WORK/$name-trt.log" \
        || { fail "$name trt export / engine build"; return; }
    grep -q "^engines: built" "$WORK/$name-trt.log" || fail "$name: engines were not built"
    step "$name: check-trt"
    vlm-export check-trt "$WORK/$name-trt-fp16" | tail -4 || fail "$name check-trt"
}

parity() {
    local name="$1"; shift
    step "$name: parity of the engines against onnxruntime CPU fp32"
    python -m vlmedge.benchmarks.trt_parity "$WORK/$name-trt-fp16" "$WORK/$name-fp32" \
        --provider trt "$@" | tee "$WORK/$name-parity.json" || fail "$name parity"
}

check_pair demo demo "$MAX_CONTEXT"
parity demo --accuracy-n "$ACCURACY_N" --max-drop 1.0

step "demo: --target trt --precision int4-fp16 (TensorRT weight-only INT4, engines)"
if vlm-export --model demo --target trt --precision int4-fp16 --max-context "$MAX_CONTEXT" \
        --output "$WORK/demo-trt-int4-fp16" --force | tee "$WORK/demo-int4-trt.log"; then
    grep -q "^engines: built" "$WORK/demo-int4-trt.log" || fail "demo int4-fp16: engines were not built"
    step "demo int4-fp16: its engines against its graphs on onnxruntime CPU"
    python -m vlmedge.benchmarks.trt_parity "$WORK/demo-trt-int4-fp16" "$WORK/demo-trt-int4-fp16" \
        --provider trt --accuracy-n "$ACCURACY_N" --max-drop 1.0 \
        | tee "$WORK/demo-int4-parity.json" || fail "demo int4-fp16 parity"
else
    fail "demo int4-fp16 trt export / engine build"
fi

PRESET="$HERE/presets/smolvlm-256m"
if [ -d "$PRESET" ]; then
    # Random weights (seeded in the loader), so both exports hold the same weights;
    # validation against PyTorch is skipped for the fp16 pair's speed, not for the reference.
    check_pair smolvlm-256m "$PRESET" "$PRESET_CONTEXT" --random-weights
    parity smolvlm-256m --scenes 4 --abs-tol 0.1 --rel-tol 0.03 --min-agree 0.75
else
    step "no $PRESET: SmolVLM-256M preset skipped"
fi

if command -v vlm-bench > /dev/null; then
    step "short vlm-bench of the demo engines (provider auto: native TensorRT engines)"
    vlm-bench "$WORK/demo-trt-fp16" "$WORK/demo-fp32" --provider auto --runs 3 --new-tokens 16 \
        --quiet --json "$WORK/bench.json" || fail "vlm-bench"
fi

step "done in ${SECONDS}s (budget ${BUDGET_S}s); results in $WORK"
[ "$SECONDS" -le "$BUDGET_S" ] || fail "took ${SECONDS}s, over the ${BUDGET_S}s budget"
exit "$FAILED"
