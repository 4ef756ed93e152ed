"""Runtime memory: what a session holds beyond its weights and KV cache
(runtime/backends.py). Peaks are measured in a child process (ru_maxrss is a
process's high-water mark), and asserted as multiples of an activation's
size, not as one machine's figure."""
import subprocess
import sys

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

# A fixed-shape chain of 16 MiB activations through the runtime's OrtBackend.
_CHAIN = """
import resource, sys
import numpy as np, onnx
from pathlib import Path
from onnx import TensorProto, helper, numpy_helper
from vlmedge.runtime.backends import OrtBackend
path, shape = Path(sys.argv[1]), [1, 2048, 2048]
nodes, inits, cur = [], [], "x"
for i in range(8):
    inits.append(numpy_helper.from_array(np.full([2048], 1.001, np.float32), f"w{i}"))
    nodes += [helper.make_node("Mul", [cur, f"w{i}"], [f"m{i}"]),
              helper.make_node("Sigmoid", [f"m{i}"], [f"s{i}"])]
    cur = f"s{i}"
io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", cur)]
onnx.save(helper.make_model(helper.make_graph(nodes, "chain", io[:1], io[1:], inits),
                            opset_imports=[helper.make_opsetid("", 17)]), path)
backend = OrtBackend(path, ["CPUExecutionProvider"], threads=1)
x = {"x": np.ones(shape, np.float32)}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(3):
    backend.run(x)  # (the output is dropped before the next run)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_fixed_shape_graph_holds_no_second_activation_plan(tmp_path):
    """onnxruntime's memory pattern reserves a fixed-shape graph's whole
    activation plan as one block beside the arena that served the first run:
    on SmolVLM-256M's vision tower at 512 px that was 165 MB (fp32) and 110 MB
    (int8) of extra peak, for no measurable speed. The runtime turns it off: a
    chain of 16 MiB activations peaks at the two alive at once plus the output
    (with the pattern: about twice that)."""
    growth = float(subprocess.run([sys.executable, "-c", _CHAIN, str(tmp_path / "chain.onnx")],
                                  check=True, capture_output=True, text=True).stdout)
    assert growth < 3 * 16, f"three runs grew the peak RSS by {growth:.0f} MiB"


def test_a_decoder_graph_without_one_position_logits_has_no_fixed_layout(tmp_path):
    """The ort decoder binds the logits into an array of its own only for a
    graph whose logits are (1, 1, V); a graph with no such output (or none
    named logits) gets None, the path that asks onnxruntime for the output,
    not an AttributeError."""
    import onnx
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from vlmedge.runtime.decoders import OrtDecoder
    for name, shape in (("y", [1, 1, 8]), ("logits", [1, "seq", 8])):
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", name)]
        path = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], [name])],
                                                      "g", io[:1], io[1:]),
                                    opset_imports=[helper.make_opsetid("", 18)]), str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert OrtDecoder(None, np.float32, 16, "cpu")._logits_layout(session) is None
