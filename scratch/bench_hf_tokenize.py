"""Time to turn a trace's text prompts into model inputs: nnsight's batching (each prompt through the pipeline's
``preprocess``) against nnterp's (one tokenizer call, padded as nnsight pads), and check they are equal.

    uv run --inexact --extra cpu python scratch/bench_hf_tokenize.py [--prompts 64] [--tokens 100]

Prints milliseconds per batch (best of 20 runs after one warm-up) on the tiny random Llama's tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def best_ms(run, repeats: int = 20) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from bench_throughput import make_prompts, model_path
    from nnsight.modeling import processing

    from nnterp import StandardizedTransformer
    from nnterp.backends.hf.text_batch import batch_text_prompts

    path = model_path("tiny", Path(os.environ.get("NNTERP_BENCH_CACHE", "/tmp/nnterp-bench")))
    model = StandardizedTransformer(path, device_map="cpu")
    invokes = [((make_prompts(model.tokenizer, args.prompts, args.tokens),), {})]
    nnsight_inputs = processing.batch_forward(model, invokes)[1]
    ours = batch_text_prompts(model, invokes)
    equal = sorted(ours) == sorted(nnsight_inputs) and all(torch.equal(ours[key], nnsight_inputs[key]) for key in ours)
    print(f"{args.prompts} prompts of {args.tokens} tokens: nnsight {best_ms(lambda: processing.batch_forward(model, invokes)):.1f} ms, "
          f"nnterp {best_ms(lambda: batch_text_prompts(model, invokes)):.1f} ms, equal inputs: {equal}")


if __name__ == "__main__":
    main()
