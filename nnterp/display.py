"""Plots: logit-lens and activation-patching heatmaps (matplotlib), the top tokens per layer (plotly) and
prompt tables (pandas); plotly and pandas are optional (the ``display`` extra).

Each matplotlib function returns a ``matplotlib.figure.Figure`` closed from pyplot: it displays once in a notebook
when it is a cell's value, never pops up on its own, and ``figure.savefig(...)`` (or ``path=``) writes it. The
backend is left as the user set it.
"""

from __future__ import annotations

import sys
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


def is_notebook() -> bool:
    """Whether the code runs in a Jupyter kernel."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:
        return False
