"""Heatmaps: labels from the tokenizer, titles, log scale, and figures that leave pyplot's state alone."""

import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.colors import LogNorm

from nnterp.display import plot_logit_lens, plot_patching

PROMPT = "The capital of France is"


def _tick_labels(axis) -> list[str]:
    return [label.get_text() for label in axis.get_ticklabels()]


@pytest.fixture
def lens(llama):
    """[layers, vocab] probabilities with a known top token per layer."""
    probs = torch.full((llama.num_layers, llama.vocab_size), 1e-4)
    for layer in range(llama.num_layers):
        probs[layer, 10 + layer] = 0.9
    return probs


def test_logit_lens_heatmap_labels_both_axes_with_tokens(llama, lens):
    figure = plot_logit_lens(llama, lens, prompt=PROMPT, position=-1)
    axes = figure.axes[0]
    decode = llama.tokenizer.decode
    last_token = llama.tokenizer(PROMPT)["input_ids"][-1]
    assert axes.get_title() == f"Logit lens: {PROMPT!r}, position -1 ({decode([last_token])!r})"
    tops = [10 + layer for layer in range(llama.num_layers)]
    assert _tick_labels(axes.yaxis) == [f"{layer} {decode([top])!r}" for layer, top in enumerate(tops)]
    columns = _tick_labels(axes.xaxis)
    assert columns[: len(tops)] == [repr(decode([top])) for top in reversed(tops)]  # last layer's top first
    image = axes.images[0].get_array()
    assert image.shape == (llama.num_layers, len(columns))
    assert image[-1, 0] == pytest.approx(0.9) and image[0, len(tops) - 1] == pytest.approx(0.9)
    assert not isinstance(axes.images[0].norm, LogNorm)


def test_logit_lens_heatmap_log_scale_and_given_tokens(llama, lens):
    figure = plot_logit_lens(llama, lens, tokens=[11, 5], log_scale=True)
    axes = figure.axes[0]
    assert isinstance(axes.images[0].norm, LogNorm)
    assert _tick_labels(axes.xaxis) == [repr(llama.tokenizer.decode([t])) for t in (11, 5)]
    assert axes.images[0].get_array()[1, 0] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="pass those tokens"):
        plot_logit_lens(llama, lens[:, :3])


def test_patching_heatmap_labels_prompt_tokens_and_target(llama):
    tokens = llama.tokenizer(PROMPT)["input_ids"]
    result = torch.rand(llama.num_layers, len(tokens))
    figure = plot_patching(llama, result, PROMPT, target_token=7)
    axes = figure.axes[0]
    assert _tick_labels(axes.xaxis) == [repr(llama.tokenizer.decode([t])) for t in tokens]
    assert repr(llama.tokenizer.decode([7])) in axes.get_title()
    with pytest.raises(ValueError, match=r"expected a \[\d+, \d+\] tensor"):
        plot_patching(llama, result[:, 1:], PROMPT)


def test_figures_leave_backend_and_open_figures_alone(llama, lens, tmp_path):
    """Usable in notebooks: no backend switch, no figure left in pyplot (it would display twice)."""
    original = matplotlib.get_backend()
    plt.switch_backend("svg")  # stands in for a notebook's backend
    try:
        before = plt.get_fignums()
        figure = plot_logit_lens(llama, lens, path=tmp_path / "lens.png")
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == before
    finally:
        plt.switch_backend(original)
    assert isinstance(figure, matplotlib.figure.Figure)
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
