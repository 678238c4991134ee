"""Write extracted activations to safetensors shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from ..backends.taps.rows import Activations


def save_activations(activations: Iterable[Activations], directory: str | Path, prompts_per_shard: int = 256) -> list[Path]:
    """Write ``activations`` (e.g. ``model.extract(...)``) as ``shard-00000.safetensors``, ... in ``directory``:
    per prompt ``"<index>/<accessor>"`` (``[layers, tokens, width]``) and ``"<index>/token_ids"``; the layers
    are in each shard's metadata. Returns the shard paths."""
    from safetensors.torch import save_file

    if prompts_per_shard < 1:
        raise ValueError(f"prompts_per_shard must be at least 1, got {prompts_per_shard}.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    tensors: dict[str, torch.Tensor] = {}
    layers = None
    count = 0

    def flush() -> None:
        nonlocal tensors, count
        path = directory / f"shard-{len(paths):05d}.safetensors"
        save_file(tensors, str(path), metadata={"layers": json.dumps(list(layers))})
        paths.append(path)
        tensors, count = {}, 0

    for item in activations:
        layers = item.layers
        for accessor, value in item.values.items():  # accessors of one prompt share a buffer: one copy each
            tensors[f"{item.index}/{accessor}"] = value.clone() if len(item.values) > 1 else value.contiguous()
        tensors[f"{item.index}/token_ids"] = torch.tensor(item.token_ids, dtype=torch.int64)
        count += 1
        if count == prompts_per_shard:
            flush()
    if count:
        flush()
    return paths
