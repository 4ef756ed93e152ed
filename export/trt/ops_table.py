"""Which ONNX operators TensorRT's ONNX parser accepts, and on what terms.

Source: written from TensorRT's published operator support list, ONNX-TensorRT
`docs/operators.md` at the 10.1 GA release (github.com/onnx/onnx-tensorrt,
branch 10.1-GA, June 2024: "TensorRT 10.0 supports operators in the
inclusive range of opset 9 to opset 20"), re-expressed as data; not a copy of
its text. Where that list and the 10.1 parser source disagree, the source
decided and the entry says so (Equal takes BOOL; Range takes no FP16).

Version range it reflects: TensorRT 10.0 to 11.x. Later parsers only add
operators and types, so a graph that passes here parses on any TensorRT in
the range; a node flagged here may still parse on a newer one (check the
operators.md of your release). TensorRT 11 removed weak typing, not
operators; the build uses strongly typed networks on both (trtexec.py).

Types are short names (`dtype_name`): fp32 fp16 bf16 fp64 fp8 int4 int8
uint8 int32 int64 bool. An op's `types` constrain the inputs at positions
`at` (the data inputs, "T" in the ONNX spec); index, shape and axes inputs
are checked by `const` (must be an initializer or a Constant node's output)
and by compat.py's data-dependent-shape analysis.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TABLE_SOURCE = "ONNX-TensorRT docs/operators.md, 10.1 GA release (June 2024)"
TENSORRT_RANGE = ">=10.0, <12"  # the versions this table is valid for (see above)
OPSET_RANGE = (9, 20)  # default-domain opsets TensorRT 10.0+ parses
# Opsets only later releases parse: 21 is the first with int4 tensors and
# blocked DequantizeLinear (TensorRT's weight-only INT4 from ONNX); the 10.15
# GA operators.md takes "opset 9 to opset 24".
LATER_OPSET_RANGE = (21, 24)
LATER_OPSET_SOURCE = "ONNX-TensorRT docs/operators.md, 10.15 GA release"
# TensorRT's INT4 (weights only): blocks of these sizes along one of the last
# two axes (its "Quantization Schemes" guide).
INT4_BLOCK_SIZES = (64, 128)

FLOAT = frozenset({"fp32", "fp16", "bf16"})
FLOAT_NO_BF16 = frozenset({"fp32", "fp16"})
INT = frozenset({"int32", "int64"})
NUM = FLOAT | INT
ANY = NUM | {"bool"}
BOOL = frozenset({"bool"})
# Quantized types: only behind Q/DQ nodes (explicit quantization).
QUANTIZED = frozenset({"int8", "fp8", "int4"})
# Types a TensorRT network input or output may have (uint8 only at the boundary).
IO_TYPES = NUM | {"bool", "int8", "uint8", "fp8"}


@dataclass(frozen=True)
class OpRule:
    """What TensorRT accepts for one op.

    types: element types allowed at the inputs `at`.
    const: inputs that must be initializers (or Constant outputs).
    attrs: attribute constraints {name: allowed values}; a missing attribute
        takes the ONNX default, given in `defaults`.
    note:  the restriction in words, for the report."""
    types: frozenset[str]
    at: tuple[int, ...] = (0,)
    const: tuple[int, ...] = ()
    attrs: dict[str, frozenset] = field(default_factory=dict)
    defaults: dict[str, object] = field(default_factory=dict)
    note: str = ""


def _r(types, at=(0,), const=(), note="", attrs=None, defaults=None) -> OpRule:
    return OpRule(frozenset(types), tuple(at), tuple(const), dict(attrs or {}),
                  dict(defaults or {}), note)


_ONE = frozenset({1})
_AXES_CONST = "its axes input must be an initializer"

SUPPORTED: dict[str, OpRule] = {
    # -- elementwise arithmetic and comparison: all inputs share T -------------
    **{op: _r(NUM, at=(0, 1)) for op in ("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min",
                                          "Greater", "GreaterOrEqual", "Less", "LessOrEqual")},
    # The list omits BOOL for Equal; the 10.1 parser's elementwise check accepts
    # every type for it (importerUtils.cpp, elementwiseCheck).
    "Equal": _r(ANY, at=(0, 1)),
    "Sum": _r(NUM), "Mean": _r(NUM | {"fp8"}),
    "Pow": _r(FLOAT, at=(0, 1), note="no integer or bool operands"),
    **{op: _r(BOOL, at=(0, 1)) for op in ("And", "Or", "Xor")},
    "Not": _r(BOOL),
    **{op: _r(NUM) for op in ("Abs", "Neg", "Relu", "Sign", "Shrink", "IsNaN")},
    # -- float-only unary math and activations --------------------------------
    **{op: _r(FLOAT) for op in (
        "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Celu", "Clip", "Cos", "Cosh",
        "Elu", "Erf", "Exp", "Floor", "HardSigmoid", "HardSwish", "ImageScaler", "IsInf",
        "LeakyRelu", "Log", "LogSoftmax", "ParametricSoftplus", "PRelu", "Reciprocal", "Round",
        "ScaledTanh", "Selu", "Sigmoid", "Sin", "Sinh", "Softmax", "Softplus", "Softsign",
        "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Upsample")},
    "Gelu": _r(FLOAT | {"int8", "int32", "int64"}),
    "Mish": _r(FLOAT_NO_BF16),
    # -- linear algebra, convolution, normalization, pooling --------------------
    "MatMul": _r(FLOAT, at=(0, 1)), "Gemm": _r(FLOAT, at=(0, 1)), "Einsum": _r(FLOAT),
    "Conv": _r(FLOAT), "ConvTranspose": _r(FLOAT),
    "DeformConv": _r(FLOAT_NO_BF16, note="1-D or 2-D spatial input, symmetric pads"),
    "BatchNormalization": _r(FLOAT), "InstanceNormalization": _r(FLOAT),
    "GroupNormalization": _r(FLOAT), "MeanVarianceNormalization": _r(FLOAT),
    "LpNormalization": _r(FLOAT), "LRN": _r(FLOAT),
    "LayerNormalization": _r(FLOAT, note="only the first output (Y) may be used"),
    "AveragePool": _r(FLOAT, note="2-D or 3-D pooling; dilations all 1"),
    "MaxPool": _r(FLOAT, note="2-D or 3-D pooling; dilations all 1; no Indices output"),
    "LpPool": _r(FLOAT, note="dilations all 1"),
    "GlobalAveragePool": _r(FLOAT), "GlobalLpPool": _r(FLOAT), "GlobalMaxPool": _r(FLOAT),
    # -- reductions: axes (input 1 from opset 18, 13 for ReduceSum) constant ----
    **{op: _r(NUM, const=(1,), note=_AXES_CONST) for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
    "ArgMax": _r(NUM), "ArgMin": _r(NUM),
    "CumSum": _r(FLOAT, const=(1,), note="its axis input must be an initializer"),
    "TopK": _r(NUM, attrs={"sorted": _ONE}, defaults={"sorted": 1},
               note="sorted must be 1; K below 3840"),
    "Hardmax": _r(FLOAT, note="the axis dimension must be known at build time"),
    # -- shape and data movement -------------------------------------------------
    **{op: _r(ANY) for op in (
        "Concat", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Identity",
        "Reshape", "ReverseSequence", "Shape", "Size", "Split", "Tile", "Transpose", "Trilu")},
    "Slice": _r(ANY, const=(3,), note=_AXES_CONST),
    "Squeeze": _r(ANY, const=(1,), note=_AXES_CONST),
    "Unsqueeze": _r(ANY, const=(1,), note="its axes input must be constant"),
    "Pad": _r(NUM, const=(3,), note=_AXES_CONST),
    "DepthToSpace": _r(NUM), "SpaceToDepth": _r(NUM),
    "Where": _r(ANY, at=(1, 2)),  # the condition (input 0) is checked as BOOL in compat.py
    "Scatter": _r(NUM), "ScatterElements": _r(NUM),
    "ScatterND": _r(NUM, attrs={"reduction": frozenset({"none"})}, defaults={"reduction": "none"},
                    note="no reduction"),
    "OneHot": _r(ANY, const=(1,), note="depth must be an initializer"),
    "EyeLike": _r(ANY, note="its input must have static dimensions"),
    "Range": _r({"fp32", "int32", "int64"}, at=(0, 1, 2),
                note="start, limit and delta of one type; the 10.1 parser takes fp32, int32, "
                     "int64 (the list also names FP16/BF16)"),
    "Resize": _r(FLOAT, attrs={
        "mode": frozenset({"nearest", "linear"}),
        "coordinate_transformation_mode": frozenset({"half_pixel", "pytorch_half_pixel",
                                                     "tf_half_pixel_for_nn", "asymmetric",
                                                     "align_corners"}),
        "nearest_mode": frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}),
        "keep_aspect_ratio_policy": frozenset({"stretch"}),
        "antialias": frozenset({0})},
        defaults={"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                  "nearest_mode": "round_prefer_floor", "keep_aspect_ratio_policy": "stretch",
                  "antialias": 0},
        note="nearest or linear; no antialiasing; stretch aspect policy"),
    "GridSample": _r(FLOAT_NO_BF16, note="4-D input"),
    "RoiAlign": _r(FLOAT_NO_BF16),
    # -- types, constants, randomness ------------------------------------------------
    "Cast": _r(NUM | {"uint8", "bool"}), "CastLike": _r(NUM | {"uint8", "bool"}),
    "Constant": _r(ANY, at=(), note="no sparse_value, value_string or value_strings"),
    "ConstantOfShape": _r(ANY, at=()),
    "Dropout": _r(FLOAT, note="training_mode must be a constant false"),
    **{op: _r(FLOAT, at=()) for op in ("RandomNormal", "RandomUniform")},
    **{op: _r(FLOAT) for op in ("RandomNormalLike", "RandomUniformLike")},
    # -- explicit quantization (Q/DQ): symmetric, zero point 0 --------------------------
    "QuantizeLinear": _r(FLOAT, note="y_zero_point must be 0 and signed (int8/fp8/int4)"),
    "DequantizeLinear": _r(QUANTIZED, note="x_zero_point must be 0; int8, fp8 or int4 input"),
    # -- control flow and recurrent ------------------------------------------------------
    "If": _r(ANY, at=(), note="branch outputs of equal rank and distinct names"),
    "Loop": _r(ANY, at=(), note="scan outputs need a build-time length; loop-carried shapes fixed"),
    "Scan": _r(FLOAT, at=()),
    "LSTM": _r(FLOAT, attrs={"input_forget": frozenset({0}), "layout": frozenset({0})},
               defaults={"input_forget": 0, "layout": 0}, note="input_forget 0, layout 0"),
    "GRU": _r(FLOAT), "RNN": _r(FLOAT),
    "NonMaxSuppression": _r(FLOAT_NO_BF16),
    "NonZero": _r(FLOAT_NO_BF16 | INT | {"bool"}),
}

# Listed as unsupported; the reason is the hint printed for the node.
_INTEGER_QUANT = ("dynamically quantized (int8-dynamic) graphs are for onnxruntime on a CPU; "
                  "TensorRT needs explicit Q/DQ graphs: export --precision int8")
UNSUPPORTED: dict[str, str] = {
    **{op: _INTEGER_QUANT for op in ("MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
                                     "QLinearConv", "QLinearMatMul")},
    **{op: "sequence and optional types do not exist in TensorRT" for op in (
        "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement",
        "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SequenceMap", "SplitToSequence")},
    **{op: "strings do not exist in TensorRT" for op in (
        "RegexFullMatch", "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer")},
    **{op: "bitwise integer ops are not in TensorRT's ONNX operator list" for op in (
        "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor")},
    **{op: "signal-processing ops are not in TensorRT's ONNX operator list" for op in (
        "BlackmanWindow", "DFT", "HammingWindow", "HannWindow", "MelWeightMatrix", "STFT")},
    "Unique": "its output size depends on the data (and TensorRT has no Unique)",
    "Compress": "its output size depends on the data (and TensorRT has no Compress)",
    **{op: "not in TensorRT's ONNX operator list" for op in (
        "AffineGrid", "Bernoulli", "CenterCropPad", "Col2Im", "Det", "ImageDecoder",
        "MaxRoiPool", "MaxUnpool", "Multinomial", "NegativeLogLikelihoodLoss",
        "SoftmaxCrossEntropyLoss")},
}

# Ops whose output SIZE is decided by input VALUES at run time: TensorRT needs
# data-dependent-shape support (an output allocator) and the optimization
# profile cannot bound them, so the runtime's preallocated buffers cannot either.
DATA_DEPENDENT_OUTPUT: dict[str, str] = {
    "NonZero": "the number of nonzero elements",
    "NonMaxSuppression": "the number of boxes kept",
    "Unique": "the number of distinct values",
    "Compress": "the number of true conditions",
}

# Inputs whose VALUES set an output shape. If such a value comes from a graph
# input's data (not from shapes or constants), TensorRT must treat that graph
# input as a shape tensor (host memory, value ranges in every profile) or
# support a data-dependent shape; the plan provides neither.
SHAPE_VALUE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,), "Range": (0, 1, 2),
    "Slice": (1, 2, 4), "Split": (1,), "Pad": (1,), "TopK": (1,), "Resize": (2, 3),
    "Upsample": (1,), "OneHot": (1,), "Loop": (0,),
}


def dtype_name(elem_type: int) -> str:
    """ONNX TensorProto element type -> this table's short name ("?" if unknown)."""
    return _ONNX_TYPES.get(elem_type, "?")


# onnx.TensorProto.DataType values (stable across onnx releases).
_ONNX_TYPES = {1: "fp32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
               7: "int64", 8: "string", 9: "bool", 10: "fp16", 11: "fp64", 12: "uint32",
               13: "uint64", 14: "complex64", 15: "complex128", 16: "bf16", 17: "fp8",
               18: "fp8", 19: "fp8", 20: "fp8", 21: "uint4", 22: "int4", 23: "fp4"}
