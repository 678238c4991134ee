"""Where a vLLM trace request's time goes: per-request milliseconds of each phase, for a trace whose requests carry
the whole model (as nnsight ships them), a trace whose requests refer to the model copy shipped once
(StandardizedVLLM's default), and extraction; plus the engine alone.

    uv run --inexact --extra cpu python scratch/profile_trace_path.py [--model tiny|random-1b|PATH] [--prompts 256]

Phases are timed by wrapping nnsight's and vLLM's functions (process CPU time on CPU, wall time on a GPU):
serializing each invoke's intervention on the client, unpickling it in the worker, the worker's forward with
the interventions run (one greenlet per request), sampling with each request's saves recorded, and collecting
saves (worker and client). Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PHASES = collections.Counter()


def clock() -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def timed(owner, name: str, phase: str, static: bool = False) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return original(*args, **kwargs)
        finally:
            PHASES[phase] += clock() - start

    setattr(owner, name, staticmethod(wrapper) if static else wrapper)


def instrument() -> None:
    from nnsight.modeling.vllm import vllm as client
    from nnsight.modeling.vllm.model_runners import GPUModelRunner as runner
    from vllm.v1.worker import gpu_model_runner

    timed(client.VLLM, "_attach_mediators", "client: serialize each invoke")
    timed(client.VLLM, "_collect", "client: collect saves", static=True)
    timed(runner.Requests, "add", "worker: unpickle each request")
    timed(gpu_model_runner.GPUModelRunner, "execute_model", "worker: forward with interventions")
    timed(gpu_model_runner.GPUModelRunner, "sample_tokens", "worker: sample, record saves")
    timed(runner.NNsightGPUModelRunner, "collect_nnsight", "worker: collect saves")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--layer", type=int, default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_throughput import make_prompts, model_path, vllm_settings

    from nnterp.standardized.vllm import StandardizedVLLM

    path = model_path(args.model, Path(os.environ.get("NNTERP_BENCH_CACHE", "/tmp/nnterp-bench")))
    settings = argparse.Namespace(max_model_len=512, max_num_seqs=256, max_batched_tokens=8192,
                                  dtype="bfloat16" if torch.cuda.is_available() else "float32")
    model = StandardizedVLLM(path, **vllm_settings(settings))
    prompts = make_prompts(model.tokenizer, args.prompts, 101)
    layer = model.num_layers // 2 if args.layer is None else args.layer
    instrument()

    def trace():
        with model.trace() as tracer:
            for prompt in prompts:
                with tracer.invoke(prompt):
                    model.layers_output[layer].cpu().save()

    def trace_carrying_the_model():
        from nnterp.standardized import vllm as standardized

        share = standardized.share_with_workers
        standardized.share_with_workers = lambda model: None
        shared = model.__dict__.pop("_persistent_id", None)
        try:
            trace()
        finally:
            standardized.share_with_workers = share
            if shared is not None:
                model.__dict__["_persistent_id"] = shared

    def extract():
        for _ in model.extract(prompts, layers=layer, progress=False):
            pass

    def engine_alone():
        from vllm import SamplingParams

        model.vllm_entrypoint.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)

    variants = {"trace (requests carry the model)": trace_carrying_the_model, "trace (requests refer to it)": trace,
                "extract": extract, "engine alone": engine_alone}
    for run in variants.values():
        run()  # warm-up (and the shared copy shipped)
    for name, run in variants.items():
        PHASES.clear()
        start = clock()
        run()
        total = clock() - start
        per_request = {phase: round(seconds * 1e3 / len(prompts), 4) for phase, seconds in PHASES.items()}
        print(json.dumps({"variant": name, "prompts": len(prompts), "ms_per_request": round(total * 1e3 / len(prompts), 4),
                          "phases_ms_per_request": per_request, "clock": "wall" if torch.cuda.is_available() else "cpu"}),
              flush=True)


if __name__ == "__main__":
    main()
