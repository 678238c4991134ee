"""The HF-vs-vLLM sweep: :func:`nnterp.validation.vllm.check_vllm_against_hf` on a tiny model of every
architecture vLLM runs, each in a forked child."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from nnterp.validation.vllm import (  # noqa: F401  (the names tests and scripts take from here)
    PROMPTS,
    check_vllm_against_hf,
    compare,
    compare_reads,
    greedy_generations,
    read_accessors,
    read_prompts,
    within_tolerance,
)

RESULT_PREFIX = "nnterp-equivalence: "


# Model types vLLM's registry does not name that it still runs through its generic Transformers backend.
UNLISTED_TRANSFORMERS_BACKEND = ("helium", "ministral", "phimoe")


def vllm_model_types() -> list[str]:
    """SmolLM2 and every transformers causal-LM model type vLLM's registry names: implemented natively (its
    text-generation and multimodal classes), run through its Transformers backend (the classes it lists as
    supported there), or dropped in an earlier release (recorded with vLLM's own reason); and a few it runs
    through the Transformers backend unlisted."""
    from vllm.model_executor.models import registry

    from .architectures import SMOLLM2
    from nnterp.testing.tiny import causal_lm_architectures

    runs = set(registry._TEXT_GENERATION_MODELS) | set(registry._MULTIMODAL_MODELS) | set(
        registry._TRANSFORMERS_SUPPORTED_MODELS) | set(registry._PREVIOUSLY_SUPPORTED_MODELS)
    named = {mt for mt, architecture in causal_lm_architectures().items() if architecture in runs}
    return [SMOLLM2, *sorted(named | set(UNLISTED_TRANSFORMERS_BACKEND))]


def check_vllm_model_type(model_type: str, workdir: str | Path) -> dict:
    """:func:`check_vllm_against_hf` on the tiny model of ``model_type`` (or SmolLM2) built under ``workdir``."""
    from .architectures import SMOLLM2
    from nnterp.testing.tiny import build_tiny_model

    if model_type == SMOLLM2:
        from nnterp.testing.smollm2 import smollm2_path

        path = smollm2_path()
    else:
        path = build_tiny_model(model_type, Path(workdir) / model_type).path
    return check_vllm_against_hf(path)


def sweep(model_types: Sequence[str], timeout: int = 600,
          on_result: Callable[[str, dict], None] | None = None) -> dict[str, dict]:
    """:func:`check_vllm_model_type` for each model type, each in a forked child (one engine per process);
    ``on_result(model_type, result)`` is called as each one finishes."""
    from nnterp.standardized import StandardizedTransformer  # noqa: F401  (inherited by the children)
    from .isolation import run_isolated

    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        for model_type in model_types:
            results[model_type] = run_isolated(check_vllm_model_type, (model_type, workdir), timeout)
            print(f"{results[model_type]['status']:4} {model_type} {results[model_type]['reason'][:150]}", file=sys.stderr, flush=True)
            if on_result is not None:
                on_result(model_type, results[model_type])
    return results


if __name__ == "__main__":
    print(RESULT_PREFIX + json.dumps(sweep(sys.argv[1:])))  # one line, among the engine's own logging
