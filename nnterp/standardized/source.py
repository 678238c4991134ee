"""What the model classes accept as their ``model`` argument, checked before any loader sees it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# A hub id: "name" or "organisation/name" (never starting with a dot); anything else is a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[\w.-]+)?$")
MODEL_DIRECTORY_FILES = ("config.json",)
VLLM_DIRECTORY_FILES = ("config.json", "params.json")  # params.json: Mistral's native format


def check_model_source(model: Any, loader: str, loaded_ok: bool = True) -> Any:
    """``model`` as the loader takes it: an existing model directory (``str``), a hub id, or (``loaded_ok``)
    a loaded ``PreTrainedModel``. Anything else raises an error that says what is wrong."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        if loaded_ok:
            return model
        raise TypeError(
            f"{loader} loads the weights itself and takes a path or hub id, not a loaded {type(model).__name__}. "
            f"Pass its directory (model.save_pretrained(path) first if it has none), or use "
            f"StandardizedTransformer(model, tokenizer=...) for a loaded model."
        )
    if isinstance(model, (str, Path)):
        return _check_path(str(model), isinstance(model, Path), loader)
    kind = "a tokenizer" if hasattr(model, "convert_ids_to_tokens") else f"a {type(model).__name__}"
    accepted = "a model directory, a hub id" + (" or a loaded transformers PreTrainedModel" if loaded_ok else "")
    hint = " Pass the model as `model` and the tokenizer as tokenizer=..." if kind == "a tokenizer" and loaded_ok else ""
    raise TypeError(f"{loader} takes {accepted} as `model`, got {kind} ({_short(model)}).{hint}")


def _check_path(text: str, is_path: bool, loader: str) -> str:
    path = Path(text).expanduser()
    vllm = loader == "StandardizedVLLM"
    if path.is_file():
        if vllm and path.suffix == ".gguf":
            return str(path)
        raise ValueError(f"{loader}: {text} is a file; pass the model directory (the one holding config.json).")
    if path.is_dir():
        expected = VLLM_DIRECTORY_FILES if vllm else MODEL_DIRECTORY_FILES
        if not any((path / name).exists() for name in expected):
            held = sorted(entry.name for entry in path.iterdir())[:10]
            raise FileNotFoundError(
                f"{loader}: {text} is a directory without {' or '.join(expected)}, so it is not a model directory "
                f"(it holds {held or 'nothing'}). Pass the directory save_pretrained wrote."
            )
        return str(path)
    if is_path or not HUB_ID.match(text):
        raise FileNotFoundError(f"{loader}: the model path {text} does not exist.")
    _check_hub_reachable(text, loader)
    return text


def _check_hub_reachable(repo_id: str, loader: str, timeout: float = 3.0) -> None:
    """A hub id that is not in the local cache needs the hub: fail at once, naming that, when it cannot be
    reached (offline mode, or no connection within ``timeout``), instead of retrying for a minute."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    endpoint = urlparse(constants.ENDPOINT)
    if constants.HF_HUB_OFFLINE:
        reason = "the HuggingFace hub is switched off (HF_HUB_OFFLINE=1)"
    else:
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
            return
        except OSError as error:
            reason = f"{endpoint.hostname} cannot be reached ({error.__class__.__name__}: the network is off or blocked)"
    raise FileNotFoundError(
        f"{loader}: {repo_id!r} is not a local directory and not in the HuggingFace cache, and {reason}. Pass the "
        f"path of a local model directory, or download the model where there is network."
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
