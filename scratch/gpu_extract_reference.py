"""Extraction on a GPU against plain HF forward passes of each prompt alone: many prompts over many engine steps,
so host blocks are reused; on vLLM the GPU writes the rows into mapped host memory, on HF the copier threads do.
On the device machine, after the payload of ``scratch/device_wheelhouse.py``:

    python3 scratch/gpu_extract_reference.py [--prompts 96] [--new 8] [--cuda-graphs] [--rtol 1e-3]
    uv run --inexact --extra cpu python scratch/gpu_extract_reference.py --prompts 24     (the CPU engine, here)

A tiny random Llama in float32. ``StandardizedVLLM.extract`` (at most 16 requests per step, so steps mix prefill
and decode rows of different prompts) and ``StandardizedTransformer.extract`` (on the GPU, batches of 8) read
``layers_input`` and ``layers_output`` of every layer; the reference is ``output_hidden_states`` of the raw HF
model run on each prompt's tokens alone (the prompt, then its generated tokens but the last). Prints the worst
difference relative to the largest value per backend and exits 1 above ``--rtol``, or when a prompt's tokens or
row count differ.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs it too (vLLM's CPU engine), more slowly


def reference(raw: torch.nn.Module, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """``layers_input`` / ``layers_output`` of every layer from HF's hidden states (the last layer's output is the
    stream before the final norm, which hidden states do not hold: left out)."""
    with torch.no_grad():
        states = raw(torch.tensor([token_ids], device=DEVICE), output_hidden_states=True).hidden_states
    stacked = torch.stack([state[0].float().cpu() for state in states])
    return {"layers_input": stacked[:-1], "layers_output": stacked[1:-1]}


def worst(results, raw) -> tuple[float, list[str]]:
    problems, worst_relative = [], 0.0
    for result in results:
        expected = reference(raw, result.token_ids)
        for name, value in expected.items():
            got = result[name][: value.shape[0]].float()
            if got.shape != value.shape:
                problems.append(f"prompt {result.index} {name}: shape {tuple(got.shape)} != {tuple(value.shape)}")
                continue
            worst_relative = max(worst_relative, float((got - value).abs().max() / value.abs().max()))
    return worst_relative, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--new", type=int, default=8)
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--rtol", type=float, default=1e-3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from nnterp import StandardizedTransformer
    from nnterp.extraction import ACCESSORS
    from nnterp.standardized.vllm import StandardizedVLLM
    from nnterp.testing.tiny import build_tiny_model

    words = "the cat sat on a mat while one two three dogs ran far away from Paris and Berlin".split()
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 60))) for _ in range(args.prompts)]
    accessors = ("layers_input", "layers_output")
    failed = False
    with tempfile.TemporaryDirectory() as workdir:
        path = str(build_tiny_model("llama", Path(workdir) / "llama").path)
        raw = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(DEVICE).eval()
        with StandardizedVLLM(path, dtype="float32", max_model_len=256, max_num_seqs=16, check_layout=False,
                              cuda_graphs=args.cuda_graphs) as vllm_model:
            vllm_results = list(vllm_model.extract(prompts, accessors=accessors, max_new_tokens=args.new,
                                                   ignore_eos=True, progress=False))
        hf = StandardizedTransformer(path, device_map=DEVICE, check_layout=False)
        hf_results = list(hf.extract([result.token_ids for result in vllm_results], accessors=accessors,
                                     batch_size=8, progress=False))
        for name, results in (("vllm", vllm_results), ("hf", hf_results)):
            relative, problems = worst(results, raw)
            counts = sorted({len(result.token_ids) for result in results})
            print(f"{name}: {len(results)} prompts, {counts[0]}..{counts[-1]} rows, worst difference "
                  f"{relative:.2e} of the largest value; {problems[:5] or 'no shape problems'}", flush=True)
            failed |= bool(problems) or relative > args.rtol
    print("verdict:", "differs" if failed else "equal")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
