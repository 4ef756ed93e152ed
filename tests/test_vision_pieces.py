"""The ort flavour's vision MLPs in pieces of the patch sequence
(export/vision_chunks.py): the same features from the cut graph, its weights
file untouched, and every graph it cannot cut kept whole with one line."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vlmedge.export import vision_chunks, vision_fusion  # noqa: E402

D, WIDE = 16, 64


class Block(torch.nn.Module):
    """A ViT layer's second half: x + fc2(act(fc1(ln(x)))), with `act` tanh
    GELU (SigLIP), quick_gelu (CLIP) or erf GELU; `leak` also adds the
    activation's first D columns to the output (its tensor read outside the MLP)."""

    def __init__(self, act: str, leak: bool = False):
        super().__init__()
        self.ln = torch.nn.LayerNorm(D)
        self.fc1, self.fc2 = torch.nn.Linear(D, WIDE), torch.nn.Linear(WIDE, D)
        self.act, self.leak = act, leak

    def forward(self, x):
        h = self.fc1(self.ln(x))
        if self.act == "tanh":
            h = torch.nn.functional.gelu(h, approximate="tanh")
        elif self.act == "quick":
            h = h * torch.sigmoid(1.702 * h)
        else:
            h = torch.nn.functional.gelu(h)
        y = x + self.fc2(h)
        return y + h[..., :D] if self.leak else y


def _graph(path, act="tanh", rows=40, leak=False, dynamic=False):
    torch.manual_seed(0)
    x = torch.randn(1, rows, D)
    kw = {"dynamic_shapes": ({1: torch.export.Dim("patches", min=2, max=4096)},)} \
        if dynamic else {}
    torch.onnx.export(Block(act, leak).eval(), (x,), str(path), input_names=["pixel_values"],
                      dynamo=True, external_data=True, opset_version=18, **kw)
    return x.numpy()


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": x})[0]


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("pieces_of, want", [((1024, 256), [256] * 4),
                                             ((17, 5), [5, 4, 4, 4]),
                                             ((1025, 256), [205] * 5),
                                             ((256, 256), [256])])
def test_piece_sizes(pieces_of, want):
    assert vision_chunks._piece_sizes(*pieces_of) == want


@pytest.mark.parametrize("act, fuse", [("tanh", True), ("tanh", False), ("quick", False),
                                       ("erf", False)])
def test_an_mlp_runs_in_pieces_with_the_same_features(act, fuse, tmp_path):
    """SigLIP's MLP (its tanh GELU as FastGelu with the fc1 bias, or written
    out in eight ops), CLIP's quick_gelu and the erf GELU (InternViT): the cut
    graph has one Split and one Concat, gives the same features, and leaves
    the weights file as it was and nothing else in the folder."""
    path = tmp_path / "vision.onnx"
    x = _graph(path, act)
    if fuse:
        assert vision_fusion.fuse(path, lambda _: None)
    want = _run(path, x)
    data = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".onnx"}
    lines = []
    cut = vision_chunks.chunk_mlps(path, lines.append, rows=16)
    assert cut, lines
    assert lines == ["[vision-pieces] the MLPs of vision.onnx run in pieces: 1 in 3 pieces of "
                     "<= 14 of their 40 rows (features within 0.0e+00 relative of the whole "
                     "graph's; bound 0.0001)"]
    ops = _ops(path)
    assert ops.count("Split") == 1 and ops.count("Concat") == 1
    assert ops.count("MatMul") == 6  # fc1 and fc2 in each of the 3 pieces
    np.testing.assert_array_equal(_run(path, x), want)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.suffix != ".onnx"} == data
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["vision.onnx", *data])


class TowerAndProjector(torch.nn.Module):
    """Two MLPs on sequences of different lengths: a tower layer on every
    patch, then a projector on every second one (as a pooled projector)."""

    def __init__(self):
        super().__init__()
        self.tower, self.projector = Block("quick"), Block("tanh")

    def forward(self, x):
        return self.projector(self.tower(x)[:, ::2])


@pytest.mark.parametrize("rows, said", [
    (16, "1 in 3 pieces of <= 14 of their 40 rows; 1 in 2 pieces of <= 10 of their 20 rows"),
    (32, "1 in 2 pieces of <= 20 of their 40 rows"),
])
def test_each_mlp_is_cut_by_its_own_length(rows, said, tmp_path):
    """Each MLP's pieces follow its own sequence length (a projector after a
    pooling has fewer rows than the tower), and one within `rows` stays whole."""
    torch.manual_seed(0)
    x = torch.randn(1, 40, D)
    path = tmp_path / "vision.onnx"
    torch.onnx.export(TowerAndProjector().eval(), (x,), str(path), input_names=["pixel_values"],
                      dynamo=True, external_data=True, opset_version=18)
    want = _run(path, x.numpy())
    lines = []
    assert vision_chunks.chunk_mlps(path, lines.append, rows=rows)
    assert lines[0].startswith(f"[vision-pieces] the MLPs of vision.onnx run in pieces: {said} (")
    np.testing.assert_array_equal(_run(path, x.numpy()), want)


@pytest.mark.parametrize("case, words", [
    ("dynamic", "its sequence length is not fixed"),
    ("short", "40 patches, within 64"),
    ("leak", "no MLP"),
])
def test_graphs_it_cannot_cut_are_kept_whole(case, words, tmp_path):
    """A sequence length that varies, one within a piece, and an activation
    read outside the MLP: the graph is left byte for byte, with one line."""
    path = tmp_path / "vision.onnx"
    _graph(path, "quick", leak=case == "leak", dynamic=case == "dynamic")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    lines = []
    assert not vision_chunks.chunk_mlps(path, lines.append, rows=64 if case == "short" else 16)
    assert len(lines) == 1 and lines[0].startswith("[vision-pieces] vision.onnx kept whole: ")
    assert words in lines[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_cut_that_changes_the_features_is_not_written(tmp_path, monkeypatch):
    """The check is real: a cut whose pieces are put back in the wrong order
    differs from the whole graph, and the graph is kept whole."""
    path = tmp_path / "vision.onnx"
    _graph(path, "quick")
    before = path.read_bytes()
    real = vision_chunks._cut

    def reversed_concat(helper, mlp, sizes, name):
        made = real(helper, mlp, sizes, name)
        for nodes in made.values():
            for n in nodes:
                if n.op_type == "Concat":
                    n.input[:] = list(n.input)[::-1]
        return made

    monkeypatch.setattr(vision_chunks, "_cut", reversed_concat)
    lines = []
    assert not vision_chunks.chunk_mlps(path, lines.append, rows=16)
    assert "kept whole: the cut graph's features differ" in lines[0]
    assert path.read_bytes() == before


def _hand_made(path, extra_output=None, scale_shape=(), q_scale_shape=None):
    """x (1, 40, 8) -> MatMul -> Add -> Mul by a one-element constant of
    `scale_shape` -> Relu -> [QuantizeLinear -> DequantizeLinear, its scale of
    `q_scale_shape`] -> MatMul -> Add, no node named (as a hand-written graph
    may be); `extra_output`: a tensor inside the MLP also made a graph output."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    consts = {"w1": rng.standard_normal((8, 16)), "b1": rng.standard_normal(16),
              "a": np.full(scale_shape, 0.5), "w2": rng.standard_normal((16, 8)),
              "b2": rng.standard_normal(8)}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]),
             helper.make_node("Add", ["h1", "b1"], ["h2"]),
             helper.make_node("Mul", ["h2", "a"], ["h3"]),
             helper.make_node("Relu", ["h3"], ["h4"])]
    last = "h4"
    if q_scale_shape is not None:
        inits += [numpy_helper.from_array(np.full(q_scale_shape, 0.05, np.float32), "qs"),
                  numpy_helper.from_array(np.zeros(q_scale_shape, np.uint8), "qz")]
        nodes += [helper.make_node("QuantizeLinear", ["h4", "qs", "qz"], ["h4q"]),
                  helper.make_node("DequantizeLinear", ["h4q", "qs", "qz"], ["h4d"])]
        last = "h4d"
    nodes += [helper.make_node("MatMul", [last, "w2"], ["h5"]),
              helper.make_node("Add", ["h5", "b2"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, 8])]
    if extra_output:
        outs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "pixel_values", TensorProto.FLOAT, [1, 40, 8])], outs, initializer=inits)
    graph.node[0].input[0] = "pixel_values"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return np.random.default_rng(1).standard_normal((1, 40, 8)).astype(np.float32)


def test_unnamed_nodes_and_a_second_cut(tmp_path):
    """Nodes without names get distinct names in every piece, and a graph cut
    once can be cut again into smaller pieces (new names that collide with
    none of the first cut's)."""
    path = tmp_path / "vision.onnx"
    x = _hand_made(path, q_scale_shape=())
    want = _run(path, x)
    lines = []
    assert vision_chunks.chunk_mlps(path, lines.append, rows=20), lines
    assert vision_chunks.chunk_mlps(path, lines.append, rows=8), lines
    assert "pieces: 1 in 2 pieces of <= 20 of their 40 rows (" in lines[0]
    assert "pieces: 2 in 3 pieces of <= 7 of their 20 rows (" in lines[1]  # each piece's MLP
    assert _ops(path).count("Split") == 3  # the first cut's 2 pieces, each cut again
    np.testing.assert_allclose(_run(path, x), want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["fc1 output", "inside the activation", "fc2 before its bias",
                                  "rank-4 scalar", "per-channel quantizer"])
def test_mlps_that_cannot_be_cut_are_not_found(case, tmp_path):
    """A tensor inside the MLP that is also a graph output (the cut would
    remove it), a one-element constant of rank 4 (it moves the sequence to
    axis 2), a quantizer with a scale per channel: no MLP, one line, the file
    as it was."""
    path = tmp_path / "vision.onnx"
    kw = {"fc1 output": {"extra_output": "h1"}, "inside the activation": {"extra_output": "h3"},
          "fc2 before its bias": {"extra_output": "h5"},
          "rank-4 scalar": {"scale_shape": (1, 1, 1, 1)},
          "per-channel quantizer": {"q_scale_shape": (16,)}}[case]
    _hand_made(path, **kw)
    before = path.read_bytes()
    lines = []
    assert not vision_chunks.chunk_mlps(path, lines.append, rows=16)
    assert lines == ["[vision-pieces] vision.onnx kept whole: no MLP (fc1, activation, fc2) "
                     "found"]
    assert path.read_bytes() == before


class TowerAndPooledProjector(torch.nn.Module):
    """A tower layer on every patch, then a projector MLP on the mean of the
    patches (batch, width): rank 2, not a sequence."""

    def __init__(self):
        super().__init__()
        self.tower = Block("quick")
        # matmuls of parameters (torch writes a 2-D Linear as Gemm, not MatMul)
        self.w1, self.w2 = (torch.nn.Parameter(torch.randn(*s) / 4) for s in ((D, WIDE),
                                                                             (WIDE, D)))
        self.b1 = torch.nn.Parameter(torch.randn(WIDE))

    def forward(self, x):
        pooled = self.tower(x).mean(1)
        return torch.nn.functional.gelu(pooled @ self.w1 + self.b1) @ self.w2


def test_an_mlp_on_pooled_features_leaves_the_tower_to_be_cut(tmp_path):
    """An MLP whose input is not (batch, sequence, width) is left whole; the
    tower's MLP is still cut (both are found: the pooled one is measured and
    set aside, not a reason to keep the whole graph)."""
    torch.manual_seed(0)
    x = torch.randn(1, 40, D)
    path = tmp_path / "vision.onnx"
    torch.onnx.export(TowerAndPooledProjector().eval(), (x,), str(path),
                      input_names=["pixel_values"], dynamo=True, external_data=True,
                      opset_version=18)
    want = _run(path, x.numpy())
    model = onnx.load(str(path), load_external_data=False)
    assert len(vision_chunks._mlps(list(model.graph.node), *vision_chunks._constants(model.graph),
                                   {o.name for o in model.graph.output})) == 2
    lines = []
    assert vision_chunks.chunk_mlps(path, lines.append, rows=16), lines
    assert "pieces: 1 in 3 pieces of <= 14 of their 40 rows (" in lines[0]
    np.testing.assert_array_equal(_run(path, x.numpy()), want)
