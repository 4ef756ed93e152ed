"""The files an ONNX model refers to, read from its bytes with the standard
library alone (the lean runtime has no `onnx` package).

An ONNX tensor whose data_location is EXTERNAL names a file in its
`external_data` entry "location", relative to the model file; onnxruntime
opens it. An artifact's graph is untrusted, so the runtime reads those names
first and holds them to the artifact's containment rules
(vlmedge/containment.py).

It also reports EPContext nodes: onnxruntime's execution-provider contexts
name a cache or engine file of their own (attribute ep_cache_context) that an
execution provider deserializes; an artifact never has them.

Only the protobuf messages that can hold a TensorProto are walked (field
numbers from onnx.proto, ONNX IR 10):

    ModelProto        graph 7, training_info 20, functions 25
    TrainingInfoProto initialization 1, algorithm 2          (GraphProto)
    GraphProto        node 1, initializer 5, sparse_initializer 15
    FunctionProto     node 7, attribute_proto 11
    NodeProto         op_type 4, attribute 5
    AttributeProto    t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
    SparseTensorProto values 1, indices 2                     (TensorProto)
    TensorProto       external_data 13 (StringStringEntryProto key 1, value 2)

Every other field is skipped by its wire type, without copying (large inline
weights cost nothing but the read).
"""
from __future__ import annotations

MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); deeper is malformed or hostile


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX protobuf."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise OnnxParseError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise OnnxParseError("varint longer than 10 bytes")


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message: value is an int for
    varints and fixed-width fields, a memoryview for length-delimited ones."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = 0, pos + 8
        elif wire == 5:
            value, pos = 0, pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise OnnxParseError(f"unsupported wire type {wire} (field {field})")
        if pos > end:
            raise OnnxParseError(f"field {field} runs past the end of its message")
        yield field, wire, value


# message kind -> {field number: message kind of that (length-delimited) field}
_CHILDREN = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse",
                  23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _walk(buf: memoryview, kind: str, depth: int, out: set[str], ops: set[str]) -> None:
    if depth > MAX_DEPTH:
        raise OnnxParseError(f"messages nested deeper than {MAX_DEPTH}")
    if kind == "node":
        for field, wire, value in _fields(buf):
            if field == 4 and wire == 2:
                ops.add(bytes(value).decode("utf-8", "replace"))
    if kind == "tensor":
        for field, wire, value in _fields(buf):
            if field == 13 and wire == 2:  # external_data entry
                entry = {f: v for f, w, v in _fields(value) if w == 2}
                if bytes(entry.get(1, b"")) == b"location":
                    try:
                        out.add(bytes(entry.get(2, b"")).decode("utf-8"))
                    except UnicodeDecodeError:
                        raise OnnxParseError("external data location is not UTF-8") from None
        return
    children = _CHILDREN[kind]
    for field, wire, value in _fields(buf):
        child = children.get(field)
        if child is not None and wire == 2:
            _walk(value, child, depth + 1, out, ops)


def scan(model: bytes | bytearray | memoryview) -> tuple[set[str], set[str]]:
    """(the `location` of every external-data tensor, every node op_type) of a
    serialized ModelProto, subgraphs and functions included."""
    out: set[str] = set()
    ops: set[str] = set()
    _walk(memoryview(model), "model", 0, out, ops)
    return out, ops


def external_data_locations(model: bytes | bytearray | memoryview) -> set[str]:
    """The `location` of every external-data tensor in a serialized ModelProto."""
    return scan(model)[0]
