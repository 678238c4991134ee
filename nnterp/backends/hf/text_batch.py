"""Text prompts of a trace tokenized in one call.

nnsight tokenizes each prompt of a trace on its own, through the pipeline's ``preprocess`` (a tokenizer call, a
``BatchEncoding`` and its tensors per prompt): about 0.15 ms a prompt, 10 ms for a batch of 64, which is a fifth
of a 1B model's forward on a GPU. When every invoke is plain text with no arguments and the pipeline would call
the tokenizer with nothing but the text, the same rows come from one batched call of the tokenizer (the same
encoding, run over all prompts at once), padded into the tensors nnsight's collation makes (the tokenizer's pad
token for ids, nnsight's pad value for every other field, on the tokenizer's padding side), and given positions
by nnsight.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from nnsight.modeling import processing


def text_prompts(invokes: list) -> Optional[list[str]]:
    """Every prompt of ``invokes`` in order, when each invoke is one text or a list of texts with no keyword
    arguments; else None."""
    texts: list[str] = []
    for inputs, kwargs in invokes:
        if kwargs or len(inputs) != 1:
            return None
        data = inputs[0]
        if isinstance(data, str):
            texts.append(data)
        elif isinstance(data, (list, tuple)) and data and all(isinstance(text, str) for text in data):
            texts.extend(data)
        else:
            return None
    return texts or None


def plain_text_preprocessing(model: Any) -> bool:
    """Whether the pipeline of ``model`` turns a text into exactly ``tokenizer(text)`` (no prefix, no tokenizer
    arguments)."""
    from transformers import TextGenerationPipeline

    pipeline = getattr(model, "pipeline", None)
    if type(pipeline) is not TextGenerationPipeline or pipeline.tokenizer is not model.tokenizer:
        return False
    preprocess_params, _, _ = processing.sanitize(model, {})
    return not preprocess_params


def batch_text_prompts(model: Any, invokes: list) -> Optional[dict]:
    """The model inputs of a trace whose invokes are plain text, tokenized in one call; None for any other
    trace (nnsight's per-prompt preprocessing then runs)."""
    texts = text_prompts(invokes)
    if texts is None or not plain_text_preprocessing(model):
        return None
    encoded = model.tokenizer(texts)
    encoding = _padded(model, dict(encoded), len(texts))
    if encoding is None:  # a field nnsight pads otherwise, or no pad token: its collation decides (or refuses)
        rows = [{key: torch.tensor([values[index]], dtype=torch.long) for key, values in encoded.items()}
                for index in range(len(texts))]
        encoding = processing.collate(model, rows)
    processing.supply_position_ids(model, encoding)
    return encoding


def _padded(model: Any, encoded: dict[str, list], count: int) -> Optional[dict[str, torch.Tensor]]:
    """``encoded``'s rows as ``[count, width]`` tensors padded as nnsight's ``collate`` pads them; None where a
    field has no pad value."""
    widths = {len(values) for rows in encoded.values() for values in rows}
    width = max(widths)
    left = getattr(model.tokenizer, "padding_side", None) == "left"
    tensors = {}
    for key, rows in encoded.items():
        fill = model.tokenizer.pad_token_id if key == "input_ids" else processing.ROW_FIELDS.get(key)
        if key not in processing.ROW_FIELDS or (fill is None and len(widths) > 1):
            return None
        array = np.full((count, width), fill if fill is not None else 0, dtype=np.int64)
        for index, values in enumerate(rows):
            if left:
                array[index, width - len(values):] = values
            else:
                array[index, :len(values)] = values
        tensors[key] = torch.from_numpy(array)
    return tensors
