"""Heatmaps for logit-lens and activation-patching results (matplotlib, saved as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def _heatmap(values: torch.Tensor, x_labels: Sequence[str], y_labels: Sequence[str], title: str, colorbar: str, path: str | Path | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = values.detach().float().cpu()
    if values.ndim != 2 or values.shape != (len(y_labels), len(x_labels)):
        raise ValueError(f"expected a [{len(y_labels)}, {len(x_labels)}] tensor, got {tuple(values.shape)}.")
    figure, axes = plt.subplots(figsize=(max(4, 0.6 * len(x_labels) + 2), max(3, 0.25 * len(y_labels) + 1.5)))
    image = axes.imshow(values.numpy(), aspect="auto", cmap="viridis", origin="lower")
    axes.set_xticks(range(len(x_labels)), x_labels, rotation=45, ha="right")
    axes.set_yticks(range(len(y_labels)), y_labels)
    axes.set_xlabel("token" if title.startswith("Patching") else "target token")
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colorbar)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def plot_logit_lens(model, probs: torch.Tensor, tokens: Sequence[int], path: str | Path | None = None, layers: Sequence[int] | None = None):
    """``probs``: ``[layers, len(tokens)]`` probabilities (one prompt, one position) from ``logit_lens``."""
    layers = list(range(probs.shape[0])) if layers is None else list(layers)
    labels = [repr(model.tokenizer.decode([int(t)])) for t in tokens]
    return _heatmap(probs, labels, [str(l) for l in layers], "Logit lens", "probability", path)


def plot_patching(model, result: torch.Tensor, prompt: str, path: str | Path | None = None, layers: Sequence[int] | None = None):
    """``result``: ``[layers, positions]`` from ``activation_patching`` over every position of ``prompt``."""
    layers = list(range(result.shape[0])) if layers is None else list(layers)
    tokens = [repr(model.tokenizer.decode([t])) for t in model.tokenizer(prompt)["input_ids"]]
    return _heatmap(result, tokens, [str(l) for l in layers], "Patching clean into corrupt", "target probability", path)
