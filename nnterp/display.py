"""Plots: logit-lens and activation-patching heatmaps (matplotlib), the top tokens per layer (plotly) and
prompt tables (pandas); plotly and pandas are optional (the ``display`` extra)."""

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


def _optional(module: str, feature: str):
    """Import an optional dependency of the ``display`` extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{feature} needs {module.split('.')[0]}, an optional dependency: pip install 'nnterp[display]' "
            f"(or pip install plotly pandas)."
        ) from error


def plot_topk_tokens(
    next_token_probs: torch.Tensor,
    tokenizer,
    k: int = 4,
    title: str | None = None,
    use_token_ids: bool = False,
    file: str | Path | None = None,
    save_html: bool = True,
    height: int = 300,
    width: int = 400,
):
    """A plotly heatmap of the ``k`` most probable tokens per layer, one panel per prompt (3 per row).

    ``next_token_probs``: ``[prompts, layers, vocab]`` (e.g. from ``logit_lens``), ``[layers, vocab]`` or
    ``[vocab]``. Cells show the token (or its id with ``use_token_ids``) and are coloured by probability.
    ``file``: where to write it: ``.html`` as HTML; another suffix as an image (needs kaleido) plus, with
    ``save_html``, an HTML copy. The figure is shown in notebooks and returned.
    """
    go = _optional("plotly.graph_objects", "plot_topk_tokens")
    subplots = _optional("plotly.subplots", "plot_topk_tokens")
    probs = next_token_probs.detach().float().cpu()
    probs = probs.reshape((1,) * (3 - probs.ndim) + tuple(probs.shape)) if probs.ndim < 3 else probs
    if probs.ndim != 3:
        raise ValueError(f"next_token_probs must be [vocab], [layers, vocab] or [prompts, layers, vocab], got {tuple(next_token_probs.shape)}.")
    num_prompts, num_layers, _ = probs.shape
    columns = min(3, num_prompts)
    rows = -(-num_prompts // columns)
    figure = subplots.make_subplots(rows=rows, cols=columns, vertical_spacing=0.1, horizontal_spacing=0.05)
    for prompt, prompt_probs in enumerate(probs):
        top = prompt_probs.topk(k, dim=-1)
        ids = [[str(int(token)) for token in layer] for layer in top.indices]
        names = [[repr(tokenizer.convert_ids_to_tokens(int(token))) for token in layer] for layer in top.indices]
        hover = [[f"ID: {i}<br>Token: {n}" for i, n in zip(layer_ids, layer_names)] for layer_ids, layer_names in zip(ids, names)]
        row, column = prompt // columns + 1, prompt % columns + 1
        figure.add_trace(
            go.Heatmap(
                z=top.values.tolist(), x=list(range(k)), y=list(range(num_layers)),
                text=ids if use_token_ids else names, texttemplate="%{text}", colorscale="RdBu_r", zmin=0, zmax=1,
                colorbar=dict(title="Probability", thickness=15, len=0.9), hovertext=hover,
                hovertemplate="Layer: %{y}<br>%{hovertext}<br>Probability: %{z}<extra></extra>",
            ),
            row=row, col=column,
        )
        figure.update_xaxes(title_text="Tokens", row=row, col=column)
        figure.update_yaxes(title_text="Layers", row=row, col=column)
    figure.update_layout(title=title or f"Top {k} Tokens Heatmap", height=height * rows, width=width * columns, showlegend=False)
    if file is not None:
        file = Path(file)
        if file.suffix != ".html":
            _optional("kaleido", "plot_topk_tokens(file=<image>)")
            figure.write_image(file, scale=3)
        if save_html or file.suffix == ".html":
            figure.write_html(file if file.suffix == ".html" else file.with_suffix(".html"))
    from .utils import is_notebook

    if is_notebook():  # outside a notebook plotly would open a browser, or show nothing
        figure.show()
    return figure


def prompts_to_df(prompts, tokenizer=None):
    """A pandas DataFrame with one column per prompt: its text, each target's strings and, with a
    tokenizer, each target's tokens."""
    pandas = _optional("pandas", "prompts_to_df")
    table = {}
    for i, prompt in enumerate(prompts):
        table[i] = {"prompt": prompt.prompt}
        for target, strings in (prompt.target_strings or {}).items():
            table[i][target + "_string"] = strings
        if tokenizer is not None:
            for target, tokens in prompt.target_tokens.items():
                table[i][target + "_tokens"] = tokenizer.convert_ids_to_tokens(tokens)
    return pandas.DataFrame.from_dict(table)
