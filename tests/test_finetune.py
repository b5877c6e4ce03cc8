"""Fine-tuning through the torch backend: gradient clipping bounds each step; a prune
keeps the fine-tuned model only where it does better on held-out data."""
from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import numpy_helper

from gpp_onnx.config import TrainOptions
from gpp_onnx.data import DataSpec, load_dataset
from gpp_onnx.finetune import train_model
from gpp_onnx.samples import digits_cnn


def _step_size(clip: float) -> float:
    """Norm of the weight change of one plain SGD step (lr 1, no momentum / decay)."""
    data = load_dataset(DataSpec("digits", 1, 8, 8)).subset(np.arange(64))
    model = digits_cnn(0)
    options = TrainOptions(epochs=1.0, lr=1.0, momentum=0.0, weight_decay=0.0, batch_size=64,
                           device="cpu", clip_grad=clip)
    assert math.ceil(len(data.y) / options.batch_size) == 1  # exactly one step
    trained = train_model(model, data, options)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    return math.sqrt(sum(float(((after[k] - before[k]) ** 2).sum()) for k in before
                         if k in after and before[k].dtype == np.float32))


def test_clipping_bounds_the_step_and_no_clipping_does_not():
    unclipped = _step_size(0.0)
    assert unclipped > 0.5  # the bound below is not met trivially
    assert _step_size(0.05) == pytest.approx(0.05, rel=1e-3)


def _weights(path) -> dict:
    import onnx

    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def test_fine_tuning_that_lowers_held_out_accuracy_keeps_the_cut(tmp_path, caplog):
    """lr 0.5 overshoots: the run warns, and the model written is the repaired cut - the
    very weights the same prune writes without fine-tuning."""
    import logging

    import onnx

    from gpp_onnx import PruneConfig, prune
    from gpp_onnx.config import DataOptions
    from gpp_onnx.report import prune_summary

    data = load_dataset(DataSpec("digits", 1, 8, 8))
    src = tmp_path / "digits.onnx"
    onnx.save(train_model(digits_cnn(0), data, TrainOptions(epochs=5, lr=0.05, device="cpu")),
              src)
    config = PruneConfig(ratio=0.25, criterion="l1", latency=False, data=DataOptions("digits"))
    with caplog.at_level(logging.WARNING, logger="gpp_onnx"):
        result = prune(src, tmp_path / "small.onnx", config,
                       train=TrainOptions(epochs=1, lr=0.5, device="cpu"))
    rnd = result.report["rounds"][0]
    assert rnd["accuracy_after_finetune"] < rnd["accuracy_after_cut"]  # lr 0.5 overshoots
    assert "fine-tuning lowered the held-out accuracy" in caplog.text
    assert rnd["kept"] == "cut"
    assert result.report["after"]["accuracy"] == rnd["accuracy_after_cut"]
    assert "kept the repaired cut" in prune_summary(result)
    prune(src, tmp_path / "cut.onnx", config, train=TrainOptions(epochs=0, device="cpu"))
    written, cut = _weights(tmp_path / "small.onnx"), _weights(tmp_path / "cut.onnx")
    assert written.keys() == cut.keys()
    assert all(np.array_equal(written[k], cut[k]) for k in cut)


def test_fine_tuning_that_raises_held_out_accuracy_is_kept(tmp_path):
    import onnx

    from gpp_onnx import PruneConfig, prune
    from gpp_onnx.config import DataOptions
    from gpp_onnx.report import prune_summary

    data = load_dataset(DataSpec("digits", 1, 8, 8))
    src = tmp_path / "digits.onnx"
    onnx.save(train_model(digits_cnn(0), data, TrainOptions(epochs=5, lr=0.05, device="cpu")),
              src)
    config = PruneConfig(ratio=0.5, criterion="l1", repair="none", latency=False,
                         data=DataOptions("digits"))
    result = prune(src, tmp_path / "small.onnx", config,
                   train=TrainOptions(epochs=2, lr=0.05, device="cpu"))
    rnd = result.report["rounds"][0]
    assert rnd["accuracy_after_finetune"] > rnd["accuracy_after_cut"]
    assert rnd["kept"] == "fine-tuned"
    assert result.report["after"]["accuracy"] == rnd["accuracy_after_finetune"]
    assert "kept the repaired cut" not in prune_summary(result)
    prune(src, tmp_path / "cut.onnx", config, train=TrainOptions(epochs=0, device="cpu"))
    written, cut = _weights(tmp_path / "small.onnx"), _weights(tmp_path / "cut.onnx")
    assert any(not np.array_equal(written[k], cut[k]) for k in cut)


def test_diverging_fine_tuning_is_a_clear_error():
    from gpp_onnx.errors import DataError

    data = load_dataset(DataSpec("digits", 1, 8, 8))
    with pytest.raises(DataError, match="diverged .* lower --lr"):
        train_model(digits_cnn(0), data, TrainOptions(epochs=1, lr=1e4, clip_grad=0.0,
                                                      device="cpu"))
