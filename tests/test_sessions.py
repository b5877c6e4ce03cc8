"""The shortcuts that keep large models fast compute exactly what the long way computes.

References are independent of the shortcut: a plain onnxruntime session of the whole
serialised model, a float64 copy of the weights summed with numpy, ``onnx.save``."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gpp_onnx import files
from gpp_onnx import model as model_io
from gpp_onnx import skeleton, surgery, verify
from gpp_onnx.analysis import analyze_model
from gpp_onnx.importance import magnitude
from gpp_onnx.importance.magnitude import Magnitude


def _conv_net(dtype=np.float32) -> onnx.ModelProto:
    """Two convs: a weight large enough to be detached (64x64x3x3), small ones inline."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(dtype), n) for n, s in
             [("w1", (64, 3, 3, 3)), ("b1", (64,)), ("w2", (64, 64, 3, 3))]]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info(
        "x", elem, ["N", 3, 8, 8])], [helper.make_tensor_value_info("y", elem, ["N", 64, 8, 8])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _whole(model: onnx.ModelProto, optimize: bool):
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("optimize", [False, True])
def test_detached_session_is_bitwise_the_whole_model(dtype, optimize):
    model = _conv_net(dtype)
    detached = verify.detach(model)
    assert set(detached.arrays) == {"w2"}  # w1 and b1 are below DETACH_MIN_BYTES
    x = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(dtype)}
    want = _whole(model, optimize).run(None, x)
    for source in (model, detached):
        got = verify.make_session(source, optimize=optimize).run(None, x)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_plain_outputs_are_the_whole_models_unoptimised_outputs():
    model = _conv_net()
    view = analyze_model(model).view
    feeds = view.check_feeds(3)
    want = _whole(model, optimize=False).run(None, feeds)
    got = view.plain_outputs(feeds)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("p", [1, 2])
def test_chunked_slice_norms_equal_one_float64_copy(monkeypatch, p):
    monkeypatch.setattr(magnitude, "CHUNK", 1000)  # many chunks, and chunks of one row
    rng = np.random.default_rng(0)
    for shape in [(64, 3, 7, 7), (301, 40), (7, 400), (3, 1), (1, 5000), (2049, 3, 1, 1)]:
        w = rng.standard_normal(shape).astype(np.float32)
        for axis in range(w.ndim):
            rows = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0).reshape(shape[axis], -1)
            want = rows.sum(axis=1) if p == 1 else np.sqrt((rows ** 2).sum(axis=1))
            assert np.array_equal(Magnitude(p)._slice_norms(w, axis), want), (shape, axis)


def test_save_writes_the_given_bytes_atomically(tmp_path):
    model = _conv_net()
    data = model.SerializeToString()
    out = files.save(model, tmp_path / "m.onnx", data)
    onnx.save(model, tmp_path / "ref.onnx")
    assert out.read_bytes() == (tmp_path / "ref.onnx").read_bytes() == data
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_checker_reads_the_files_bytes_only_when_they_hold_the_model(tmp_path, monkeypatch):
    checked = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model",
                        lambda m, *a, **k: (checked.append(m), real(m, *a, **k))[1])
    model = _conv_net()
    onnx.save(model, tmp_path / "m.onnx")
    model_io.read(tmp_path / "m.onnx")
    shuffled = _conv_net()
    nodes = list(shuffled.graph.node)[::-1]
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(nodes)
    onnx.save(shuffled, tmp_path / "s.onnx")
    model_io.read(tmp_path / "s.onnx")  # sorted on load: the file is not the model
    onnx.save(model, tmp_path / "e.onnx", save_as_external_data=True, size_threshold=0)
    model_io.read(tmp_path / "e.onnx")
    assert [type(m).__name__ for m in checked] == ["bytes"] * 3
    assert checked[0] == (tmp_path / "m.onnx").read_bytes()          # as read
    assert onnx.load_from_string(checked[1]).graph.node[0].output[0] == "h"   # sorted
    assert checked[1] != (tmp_path / "s.onnx").read_bytes()
    weights = onnx.load_from_string(checked[2]).graph.initializer     # data loaded
    assert all(t.raw_data and not t.external_data for t in weights)


@pytest.mark.parametrize("with_values", [surgery.cut_with_values, surgery.mask_with_values])
def test_surgery_values_are_what_its_tensors_hold(with_values):
    """Sessions of the cut and masked models take the arrays surgery wrote; each must be
    the value of the tensor of that name (a repaired bias included), and nothing else."""
    model = model_io.normalize(_conv_net())
    analysis = analyze_model(model)
    group = analysis.prunable[0]
    value = group.members[0].value
    kept = {m.value: np.arange(0, analysis.view.shape(m.value)[m.axis], 2)
            for m in group.members}
    node = analysis.view.producer[value].name
    deltas = {node: np.linspace(-1, 1, analysis.view.shape(value)[1]).astype(np.float32)}
    out, values = with_values(analysis, kept, deltas)
    known = 0
    for t in out.graph.initializer:
        got = values(t.name)
        if got is not None:
            known += 1
            assert got.dtype == numpy_helper.to_array(t).dtype
            assert np.array_equal(got, numpy_helper.to_array(t))
    assert known == len(out.graph.initializer)
    assert values("no such tensor") is None
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert all(np.array_equal(a, b) for a, b in zip(
        verify.run(verify.session_source(out, values), feeds), _whole(out, False).run(None, feeds)))


def _shape_ops_net() -> onnx.ModelProto:
    """Large float weights beside the shape-like integer tensors inference reads (Split
    sizes, Slice bounds, a Reshape target, Resize scales)."""
    from gpp_onnx.samples import GraphBuilder

    b = GraphBuilder((1, 3, 16, 16), seed=0)
    x = b.act(b.bn(b.conv("input", 64)), "Relu")
    x = b.conv(x, 64)                                      # 64x64x3x3: shape only
    a, c = b.split(x, [32, 32])
    x = b.concat([b.slice(a, 0, 16), b.shuffle(b.resize(b.pool(c), 2), 4)])
    return b.build(b.gemm(b.reshape_flatten(b.gap(x)), 80))


@pytest.mark.parametrize("make", [_conv_net, _shape_ops_net])
def test_shape_inference_on_the_skeleton_equals_onnx_on_the_model(make):
    model = model_io.normalize(make())
    analysis = analyze_model(model)
    kept = {m.value: np.arange(0, analysis.view.shape(m.value)[m.axis], 2)
            for g in analysis.prunable for m in g.members}
    cut, _ = surgery._apply(analysis, kept, surgery._cuts(analysis, kept), surgery._take, True)
    assert any(t.data_type == TensorProto.FLOAT and np.prod(t.dims) >= skeleton.MIN_ELEMENTS
               for t in cut.graph.initializer)
    reference = onnx.shape_inference.infer_shapes(cut, strict_mode=False)
    assert len(reference.graph.value_info) > 0
    surgery._infer_shapes(cut)
    assert cut.SerializeToString() == reference.SerializeToString()


@pytest.mark.parametrize("seed", range(6))
def test_component_labels_are_networkx_components(seed):
    """Ties between random elements of a few values (chains, stars, isolated elements,
    duplicates, self-ties); reference: networkx's components numbered as found."""
    import networkx as nx

    from gpp_onnx.analysis.groups import ElementIndex, component_labels
    from gpp_onnx.ops import Tie

    rng = np.random.default_rng(seed)
    widths = {f"v{i}": int(rng.integers(1, 40)) for i in range(int(rng.integers(2, 8)))}
    index = ElementIndex(widths)
    names = list(widths)
    ties = []
    for _ in range(int(rng.integers(0, 12))):
        a, b = rng.choice(names, 2)
        n = int(rng.integers(1, 1 + min(widths[a], widths[b])))
        ties.append(Tie(a, rng.integers(0, widths[a], n), b, rng.integers(0, widths[b], n)))
    graph = nx.Graph()
    graph.add_nodes_from(range(index.total))
    for t in ties:
        graph.add_edges_from(zip(index.ids(t.a, t.ia).tolist(), index.ids(t.b, t.ib).tolist()))
    expected = np.empty(index.total, dtype=np.int64)
    for label, comp in enumerate(nx.connected_components(graph)):
        expected[list(comp)] = label
    assert np.array_equal(component_labels(index, ties), expected)


@pytest.mark.parametrize("seed", range(5))
def test_sort_nodes_is_networkx_lexicographical_order(seed):
    """A random DAG of nodes listed in random order (a node may read one value twice);
    reference: networkx's lexicographical topological sort of the node positions."""
    import networkx as nx

    from gpp_onnx.compat import sort_nodes

    rng = np.random.default_rng(seed)
    n = 40
    nodes = []
    for i in range(n):
        reads = [f"v{j}" for j in rng.choice(i, size=min(i, 3), replace=False)] if i else ["x"]
        nodes.append(helper.make_node("Sum", reads + reads[:1], [f"v{i}"], name=f"n{i}"))
    shuffled = [nodes[i] for i in rng.permutation(n)]
    graph = helper.make_graph(shuffled, "g", [], [])
    producer = {node.output[0]: k for k, node in enumerate(shuffled)}
    deps = nx.DiGraph()
    deps.add_nodes_from(range(n))
    deps.add_edges_from((producer[name], k) for k, node in enumerate(shuffled)
                        for name in node.input if name in producer)
    expected = [shuffled[k].name for k in nx.lexicographical_topological_sort(deps)]
    assert sort_nodes(graph)
    assert [node.name for node in graph.node] == expected
    assert not sort_nodes(graph)           # sorted stays as it is


def test_deferred_mask_is_mask_byte_for_byte():
    """The masked model's weights stay arrays until its ModelProto is asked for; the session
    of the deferred form and the ModelProto built later equal ``mask``'s."""
    model = model_io.normalize(_conv_net())
    analysis = analyze_model(model)
    kept = {m.value: np.arange(0, analysis.view.shape(m.value)[m.axis], 2)
            for g in analysis.prunable for m in g.members}
    eager = surgery.mask(analysis, kept)
    deferred = surgery.mask_deferred(analysis, kept)
    assert deferred.headers            # the 64x64 conv's zeroed weight was deferred
    assert all(not t.raw_data for t in deferred.skeleton.graph.initializer
               if t.name in deferred.headers)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert all(np.array_equal(a, b) for a, b in zip(
        verify.run(deferred.session(), feeds), _whole(eager, False).run(None, feeds)))
    assert deferred.model.SerializeToString() == eager.SerializeToString()


def _lstm_gemm_net(weights_listed_as_inputs: bool) -> onnx.ModelProto:
    """LSTM (W, R large enough to be detached) -> last step -> Gemm; optionally with every
    initializer also listed among the graph inputs, as IR 3 exporters write them."""
    rng = np.random.default_rng(2)
    arrays = {"W": rng.standard_normal((1, 256, 48)), "R": rng.standard_normal((1, 256, 64)),
              "B": rng.standard_normal((1, 512)), "G": rng.standard_normal((64, 200)),
              "starts": np.array([-1]), "ends": np.array([2 ** 62]), "axes": np.array([0])}
    inits = [numpy_helper.from_array(a.astype(np.float32 if a.dtype.kind == "f" else np.int64),
                                     n) for n, a in arrays.items()]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y"], hidden_size=64),
             helper.make_node("Slice", ["y", "starts", "ends", "axes"], ["last"]),
             helper.make_node("Reshape", ["last", "shape"], ["h"]),
             helper.make_node("Gemm", ["h", "G"], ["out"])]
    inits.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"))
    inputs = [helper.make_tensor_value_info("x", 1, [5, 3, 48])]
    if weights_listed_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                   for t in inits]
    graph = helper.make_graph(nodes, "rnn", inputs,
                              [helper.make_tensor_value_info("out", 1, [3, 200])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("listed", [False, True])
def test_fed_weights_compute_bitwise_what_the_whole_model_does(listed):
    """Unoptimised sessions of detached models take the large weights as inputs: outputs
    equal a session of the whole model bitwise (LSTM and Gemm kernels), and the weights
    are neither visible among the inputs nor expected in the feeds."""
    model = _lstm_gemm_net(listed)
    detached = verify.detach(model)
    assert set(detached.arrays) == {"W", "R", "G"}
    x = {"x": np.random.default_rng(3).standard_normal((5, 3, 48)).astype(np.float32)}
    # check sessions never repack weights (ORT's packed LSTM rounds differently, 3e-6)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.add_session_config_entry("session.disable_prepacking", "1")
    want = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"]).run(None, x)
    session = verify.make_session(detached, optimize=False)
    assert isinstance(session, verify.FedSession)
    assert [i.name for i in session.get_inputs()] == ["x"]
    got = session.run(None, x)
    assert np.array_equal(got[0], want[0]) and np.abs(got[0]).max() > 0
