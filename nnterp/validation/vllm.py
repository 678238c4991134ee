"""StandardizedVLLM against StandardizedTransformer on the same weights: every accessor of every layer, the
next-token probabilities and greedy generations (plain and steered), compared within float32 tolerance."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import nnsight
import torch

PROMPTS = ("The capital of France is", "Hello", "One two three four five six")
ROLES = ("layers", "attentions", "mlps")


def error_reason(error: BaseException, limit: int = 300) -> str:
    """An exception as one table cell: its type and message lines (pydantic's help links dropped)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "errors.pydantic.dev" not in line]
    return f"{type(error).__name__}: {' '.join(lines)}"[:limit]


def read_accessors(model, prompt: str) -> dict[str, list[torch.Tensor]]:
    """Every accessor of every layer as ``[tokens, ...]`` tensors (one trace per role, forward order); layers
    without a module for the role (OPT's MLP is inlined in the layer, LFM2's convolution layers have no
    attention) are left out."""
    reads: dict[str, list[torch.Tensor]] = {}
    for role in ROLES:
        indices = _layers_with(model, role)
        if not indices:
            continue
        with torch.no_grad(), model.trace(prompt):
            ins, outs = nnsight.save([]), nnsight.save([])
            for i in indices:
                ins.append(getattr(model, f"{role}_input")[i])
                outs.append(getattr(model, f"{role}_output")[i])
        reads[f"{role}_input"], reads[f"{role}_output"] = list(ins), list(outs)
    with torch.no_grad(), model.trace(prompt):
        embeddings = model.token_embeddings.save()
        probs = model.next_token_probs.save()
    reads["token_embeddings"] = [embeddings]
    flat = {name: [_prompt_tokens(value).detach().float().cpu() for value in values] for name, values in reads.items()}
    flat["next_token_probs"] = [probs.reshape(-1, probs.shape[-1])[0].float().cpu()]  # [batch, vocab] on both backends
    return flat


def _prompt_tokens(activation: torch.Tensor) -> torch.Tensor:
    """One prompt's activation as ``[tokens, ...]``: batched as ``[1, tokens, ...]`` (HF, vLLM's Transformers
    backend) or already flat (native vLLM, and HF modules that flatten their tokens: Llama 4's MoE)."""
    return activation[0] if activation.ndim >= 3 and activation.shape[0] == 1 else activation


def _layers_with(model, role: str) -> list[int]:
    """The layers that have a module for ``role`` (a hybrid stack's convolution layers have no attention)."""
    if role == "layers":
        return list(range(model.num_layers))
    from ..core.rename import layer_child

    standard = {"attentions": "self_attn", "mlps": "mlp"}[role]
    layers = model._module.get_submodule(model.names.layers)
    return [i for i in range(model.num_layers) if layer_child(layers[i], standard, model.names) is not None]


def read_prompts(model, prompts: Sequence[str] = PROMPTS) -> list[dict[str, list[torch.Tensor]]]:
    return [read_accessors(model, prompt) for prompt in prompts]


def compare_reads(expected: list[dict], actual: list[dict]) -> dict[str, dict[str, float]]:
    """Per accessor, the max abs difference over all layers and prompts (inf where shapes differ) and the
    same relative to the largest reference magnitude."""
    worst: dict[str, dict[str, float]] = {}
    for hf_reads, vllm_reads in zip(expected, actual, strict=True):
        for name, hf_values in hf_reads.items():
            entry = worst.setdefault(name, {"abs": 0.0, "rel": 0.0})
            for hf_value, vllm_value in zip(hf_values, vllm_reads[name], strict=True):
                same_shape = hf_value.shape == vllm_value.shape
                diff = (hf_value - vllm_value).abs().max().item() if same_shape else float("inf")
                scale = max(hf_value.abs().max().item(), 1e-12)
                entry["abs"], entry["rel"] = max(entry["abs"], diff), max(entry["rel"], diff / scale)
    return worst


def compare(hf_model, vllm_model, prompts: Sequence[str] = PROMPTS) -> dict[str, dict[str, float]]:
    """:func:`compare_reads` of both models on ``prompts``."""
    return compare_reads(read_prompts(hf_model, prompts), read_prompts(vllm_model, prompts))


def greedy_generations(model, prompt: str = PROMPTS[0], max_new_tokens: int = 8) -> dict[str, list[int]]:
    """Greedy continuations of ``prompt``, plain and steered at the middle layer by a fixed random direction."""
    from ..interventions import steered_generation

    direction = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    vector = 8 * direction / direction.norm() * model.hidden_size**0.5
    plain = steered_generation(model, prompt, max_new_tokens=max_new_tokens)
    steered = steered_generation(model, prompt, vector, layers=model.num_layers // 2, max_new_tokens=max_new_tokens)
    return {"plain": plain.tokens, "steered": steered.tokens}


def within_tolerance(diff: dict[str, float], atol: float = 1e-4, rtol: float = 1e-4) -> bool:
    """float32 tolerance: an absolute floor for small activations, relative for large residual streams."""
    return diff["abs"] <= atol or diff["rel"] <= rtol


def check_vllm_against_hf(path: str | Path) -> dict:
    """Read every accessor with HF, then with vLLM (HF first: vLLM's Transformers backend patches the HF
    classes it wraps), and compare; the result records per-accessor max diffs and which engine ran it."""
    from ..standardized import StandardizedTransformer
    from ..standardized.vllm import StandardizedVLLM

    start = time.time()
    result: dict = {"status": "fail", "reason": "", "max_abs_diff": {}}
    try:
        hf_model = StandardizedTransformer(str(path), check_layout=False)
        expected, hf_generations = read_prompts(hf_model), greedy_generations(hf_model)
        vllm_model = StandardizedVLLM(str(path), dtype="float32", max_model_len=128, max_num_seqs=4, check_layout=False)
        result["architecture"] = vllm_model.layout.architecture
        result["engine"] = vllm_model.engine_kind
        diffs = compare_reads(expected, read_prompts(vllm_model))
        result["max_abs_diff"] = {name: diff["abs"] for name, diff in diffs.items()}
        result["max_rel_diff"] = {name: diff["rel"] for name, diff in diffs.items()}
        result["generations"] = {"hf": hf_generations, "vllm": greedy_generations(vllm_model)}
        bad = [f"{name} {diff['abs']:.1e} (rel {diff['rel']:.1e})" for name, diff in diffs.items() if not within_tolerance(diff)]
        if result["generations"]["hf"] != result["generations"]["vllm"]:
            bad.append(f"greedy generations differ: {result['generations']}")
        result["status"] = "fail" if bad else "pass"
        result["reason"] = ", ".join(bad)
        result["layout"] = vllm_model.layout.to_json()
    except Exception as error:  # a sweep records why an architecture fails instead of stopping
        result["reason"] = error_reason(error)
    result["seconds"] = round(time.time() - start, 1)
    return result
