"""Heatmaps for logit-lens and activation-patching results (matplotlib figures).

Each function returns a ``matplotlib.figure.Figure`` closed from pyplot: it displays once in a notebook when it
is a cell's value, never pops up on its own, and ``figure.savefig(...)`` (or ``path=``) writes it. The backend
is left as the user set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LOG_SCALE_FLOOR = 1e-6  # probabilities below this share the lowest colour on a log scale


def _token_label(tokenizer, token: int) -> str:
    return repr(tokenizer.decode([int(token)]))


def _heatmap(
    values: torch.Tensor,
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    *,
    title: str,
    x_title: str,
    colorbar: str,
    log_scale: bool = False,
    path: str | Path | None = None,
) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    values = values.detach().float().cpu()
    if values.ndim != 2 or values.shape != (len(y_labels), len(x_labels)):
        raise ValueError(
            f"expected a [{len(y_labels)}, {len(x_labels)}] tensor ({len(y_labels)} layers x {len(x_labels)} columns), "
            f"got {tuple(values.shape)}."
        )
    norm = None
    if log_scale:
        values = values.clamp_min(LOG_SCALE_FLOOR)
        norm = LogNorm(vmin=LOG_SCALE_FLOOR, vmax=max(values.max().item(), LOG_SCALE_FLOOR * 10))
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(x_labels) + 2.5), max(3.0, 0.25 * len(y_labels) + 1.5)))
    plt.close(figure)  # owned by the caller, not by pyplot's list of open figures
    image = axes.imshow(values.numpy(), aspect="auto", cmap="viridis", origin="lower", norm=norm)
    axes.set_xticks(range(len(x_labels)), x_labels, rotation=45, ha="right")
    axes.set_yticks(range(len(y_labels)), y_labels)
    axes.set_xlabel(x_title)
    axes.set_ylabel("layer")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colorbar + (" (log scale)" if log_scale else ""))
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    return figure


def _default_lens_tokens(probs: torch.Tensor, count: int) -> list[int]:
    """Each layer's top token, last layer first, then the last layer's runners-up, ``count`` at most."""
    candidates = [int(t) for t in probs.argmax(-1).flip(0)] + [int(t) for t in probs[-1].topk(count).indices]
    return list(dict.fromkeys(candidates))[:count]


def plot_logit_lens(
    model,
    probs: torch.Tensor,
    tokens: Sequence[int] | None = None,
    path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    *,
    prompt: str | None = None,
    position: int = -1,
    log_scale: bool = False,
    max_tokens: int = 10,
) -> Figure:
    """Next-token probabilities read off each layer at one position of one prompt.

    ``probs`` is ``[layers, vocab]`` (the whole vocabulary) or ``[layers, len(tokens)]``. Columns are ``tokens``;
    with whole-vocabulary ``probs`` they default to the tokens some layer ranks first (at most ``max_tokens``) and
    each row is labelled with its layer's top token. ``prompt`` and ``position`` go in the title.
    """
    probs = probs.detach().float().cpu()
    layers = list(range(probs.shape[0])) if layers is None else list(layers)
    whole_vocabulary = probs.ndim == 2 and probs.shape[-1] >= model.vocab_size
    if tokens is None:
        if not whole_vocabulary:
            raise ValueError(f"probs of shape {tuple(probs.shape)} cover selected tokens only: pass those tokens.")
        tokens = _default_lens_tokens(probs, max_tokens)
    tokens = [int(t) for t in tokens]
    y_labels = [str(layer) for layer in layers]
    if whole_vocabulary:
        y_labels = [f"{layer} {_token_label(model.tokenizer, top)}" for layer, top in zip(layers, probs.argmax(-1))]
        probs = probs[:, tokens]
    title = "Logit lens"
    if prompt is not None:
        prompt_tokens = model.tokenizer(prompt)["input_ids"]
        title += f": {prompt!r}, position {position} ({_token_label(model.tokenizer, prompt_tokens[position])})"
    return _heatmap(
        probs, [_token_label(model.tokenizer, t) for t in tokens], y_labels, title=title,
        x_title="next token", colorbar="probability", log_scale=log_scale, path=path,
    )


def plot_patching(
    model,
    result: torch.Tensor,
    prompt: str,
    path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    *,
    target_token: int | None = None,
    log_scale: bool = False,
) -> Figure:
    """``result``: ``[layers, positions]`` from ``activation_patching`` over every position of ``prompt``."""
    layers = list(range(result.shape[0])) if layers is None else list(layers)
    tokens = [_token_label(model.tokenizer, t) for t in model.tokenizer(prompt)["input_ids"]]
    target = "target" if target_token is None else _token_label(model.tokenizer, target_token)
    return _heatmap(
        result, tokens, [str(layer) for layer in layers], title=f"Patching clean into corrupt: p({target})",
        x_title=f"patched position of {prompt!r}", colorbar=f"p({target})", log_scale=log_scale, path=path,
    )
