"""Report helpers: the Markdown they write and the PNGs they draw (checked as images)."""

import matplotlib
import pytest
import torch
from torch import nn

import torchprune as tp
from torchprune.analysis import report

from conftest import make_mlp


def _png(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_markdown_table():
    text = report.markdown_table(["Model", "Acc", "Params"], [["mlp|a", 97.123, 50610], ["cnn", 98.0, 7]])
    lines = text.splitlines()
    assert lines[0] == "| Model | Acc | Params |"
    assert lines[1] == "|:---|---:|---:|"
    assert lines[2] == "| mlp\\|a | 97.12 | 50,610 |"
    with pytest.raises(ValueError, match="same number of columns"):
        report.markdown_table(["a", "b"], [[1]])


def test_plots_write_images(tmp_path):
    model = make_mlp()
    tp.prune(model, sparsity=0.5)
    paths = [
        report.plot_schedule(tp.schedules.Cubic(0, 50, 5, final=0.9), 60, tmp_path / "s.png"),
        report.plot_accuracy_vs_sparsity({"one-shot": {0.5: 90.0, 0.9: 50.0}, "progressive": {0.5: 91.0, 0.9: 88.0}},
                                         tmp_path / "a.png", dense=92.0),
        report.plot_layer_sparsity({"a": model, "b": make_mlp()}, tmp_path / "l.png"),
        report.plot_importance_histograms(make_mlp(), tmp_path / "h.png", sparsity=0.9),
    ]
    for path in paths:
        image = _png(path)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0.01


def test_input_pixels_counts_kept_weights_per_pixel(tmp_path):
    layer = nn.Linear(4, 3)
    mask = torch.tensor([[1, 0, 0, 1], [1, 0, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    tp.masking.attach_mask(layer, mask)
    path = report.plot_input_pixels(layer, tmp_path / "p.png", image_shape=(2, 2), mean_image=torch.rand(4))
    _png(path)
    _png(report.plot_input_pixels({"a": layer, "b": nn.Linear(4, 2)}, tmp_path / "p2.png", image_shape=(2, 2)))
    with pytest.raises(ValueError, match="does not match in_features"):
        report.plot_input_pixels(layer, tmp_path / "q.png", image_shape=(3, 3))
    with pytest.raises(TypeError, match="first nn.Linear"):
        report.plot_input_pixels({"conv": nn.Conv2d(1, 1, 1)}, tmp_path / "q.png")
    with pytest.raises(TypeError, match="`layers`"):
        report.plot_input_pixels(nn.Conv2d(1, 1, 1), tmp_path / "q.png")
    from torchprune.demo.writeup import pixel_statistics
    stats = pixel_statistics(layer, torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert stats["ignored"] == 1 and stats["ignored_blank"] == 1 and stats["blank"] == 2
    assert stats["kept_blank"] == pytest.approx(1.5) and stats["kept_other"] == pytest.approx(2.0)


def test_latency_section_times_every_model():
    model = make_mlp()
    pruned = tp.prune(make_mlp(), sparsity=0.9)
    text = report.latency_section({"dense": model, "pruned": pruned}, torch.randn(32, 16), repeats=3)
    assert "| dense |" in text and "| pruned |" in text and "1.00x" in text and "32x16" in text
    assert model.training  # modes restored
    result = report.measure_latency(model, torch.randn(2, 16), repeats=2)
    assert 0 < result["min_ms"] <= result["median_ms"] <= result["max_ms"]
    with pytest.raises(ValueError, match="`repeats`"):
        report.measure_latency(model, torch.randn(2, 16), repeats=0)
    with pytest.raises(ValueError, match="`models`"):
        report.latency_section({}, torch.randn(2, 16))
