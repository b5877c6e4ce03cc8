"""Graph editing layer (gpp_onnx/edit.py): insert a subgraph on a value, fresh names,
sorted and checked results. References are hand-built graphs or numpy, never the editor."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from gpp_onnx.edit import Editor
from gpp_onnx.errors import InputError, VerificationError
from gpp_onnx.model import normalize
from gpp_onnx.samples import GraphBuilder

from conftest import feeds_for, rel_err, run_model


def _small():
    b = GraphBuilder((1, 3, 8, 8), seed=3)
    x = b.act(b.conv("input", 4), "Relu")
    y = b.conv(x, 5)
    return b.build(b.gemm(b.flatten(b.gap(y)), 3)), x, b


def _doubled(editor: Editor, value: str) -> str:
    two = editor.add_initializer("two", np.float32(2.0))
    return editor.add_node("Mul", [value, two], "double")


def test_insert_on_rewires_consumers_and_matches_a_hand_built_reference():
    model, relu_out, _ = _small()
    edited = Editor.copy(model)
    edited.insert_on(relu_out, _doubled)
    result = edited.finish()
    assert result.changed
    # reference: conv(2 v) == (2 W) v + b, so doubling the next conv's weight
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    conv2 = next(n for n in ref.graph.node if n.op_type == "Conv" and n.input[0] == relu_out)
    w = next(t for t in ref.graph.initializer if t.name == conv2.input[1])
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
    feeds = feeds_for(model)
    assert rel_err(run_model(result.model, feeds), run_model(ref, feeds)) < 1e-6
    assert rel_err(run_model(model, feeds), run_model(ref, feeds)) > 1e-3  # not vacuous
    assert len(model.graph.node) + 1 == len(result.model.graph.node)  # input untouched


def test_nodes_come_out_in_topological_order_with_unique_names():
    model, relu_out, _ = _small()
    editor = Editor.copy(model)
    editor.insert_on(relu_out, _doubled)
    editor.insert_on(relu_out, _doubled)  # the same base names again: made fresh
    out = editor.finish().model
    seen = {v.name for v in out.graph.input} | {t.name for t in out.graph.initializer}
    for node in out.graph.node:
        assert all(i in seen for i in node.input if i), node.name
        seen.update(node.output)
    names = [n.name for n in out.graph.node]
    assert len(names) == len(set(names))
    assert sum(n.op_type == "Mul" for n in out.graph.node) == 2
    assert {"double", "double.1"} <= set(names)


def test_fresh_avoids_every_kind_of_name():
    model, relu_out, _ = _small()
    editor = Editor.copy(model)
    taken = [model.graph.node[0].name, relu_out, model.graph.initializer[0].name,
             model.graph.input[0].name, model.graph.output[0].name]
    for name in taken:
        assert editor.fresh(name) == f"{name}.1"
    assert editor.fresh("brand_new") == "brand_new"
    assert editor.fresh("brand_new") == "brand_new.1"


def test_shapes_are_probed_again_after_an_edit():
    model, relu_out, _ = _small()
    editor = Editor.copy(model)

    def widen(ed, v):  # 4 -> 6 channels: concat two channels of zeros
        zeros = ed.add_node("Slice", [v, ed.add_initializer("s", np.array([0])),
                                      ed.add_initializer("e", np.array([2])),
                                      ed.add_initializer("a", np.array([1]))], "part")
        zeros = ed.add_node("Mul", [zeros, ed.add_initializer("z", np.float32(0))], "zero")
        return ed.add_node("Concat", [v, zeros], "wide", axis=1)

    out = editor.insert_on(relu_out, widen)
    conv2 = next(n for n in editor.model.graph.node if n.op_type == "Conv" and out in n.input)
    w = next(t for t in editor.model.graph.initializer if t.name == conv2.input[1])
    arr = numpy_helper.to_array(w)
    w.CopyFrom(numpy_helper.from_array(np.concatenate([arr, np.zeros_like(arr[:, :2])], 1),
                                       w.name))
    result = editor.finish()
    assert result.view.shape(out) == (1, 6, 8, 8)
    feeds = feeds_for(model)
    assert rel_err(run_model(result.model, feeds), run_model(model, feeds)) < 1e-6


def test_insert_on_a_graph_output_is_refused():
    model, _, _ = _small()
    with pytest.raises(InputError, match="graph output"):
        Editor.copy(model).insert_on(model.graph.output[0].name, _doubled)


def test_a_broken_edit_fails_the_check():
    model, relu_out, _ = _small()
    editor = Editor.copy(model)
    editor.insert_on(relu_out, lambda ed, v: ed.add_node("Add", [v, "nowhere"], "bad"))
    with pytest.raises(VerificationError):
        editor.finish()


def test_finish_drops_what_nothing_reads():
    model, relu_out, _ = _small()
    editor = Editor.copy(model)
    editor.add_initializer("unused", np.ones(3, np.float32))
    editor.add_node("Relu", [relu_out], "dangling")
    out = editor.finish().model
    assert "unused" not in {t.name for t in out.graph.initializer}
    assert "dangling" not in {n.name for n in out.graph.node}


def test_unchanged_edit_reports_no_change():
    model, _, _ = _small()
    assert not Editor.copy(model).finish().changed


def test_shuffle_rewrite_goes_through_the_editor():
    b = GraphBuilder((1, 4, 6, 6), seed=1)
    x = b.shuffle(b.act(b.conv("input", 8), "Relu"), 2)
    model = b.build(b.gemm(b.flatten(b.gap(b.conv(x, 4, k=1))), 3))
    out = normalize(model)
    ops = [n.op_type for n in out.graph.node]
    assert "Transpose" not in ops and ops.count("Gather") == 1
    gather = next(n for n in out.graph.node if n.op_type == "Gather")
    idx = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name == gather.input[1])
    assert idx.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]  # pi[j*g+i] = i*(C/g)+j, C=8, g=2
    feeds = feeds_for(model)
    assert rel_err(run_model(out, feeds), run_model(model, feeds)) < 1e-6
