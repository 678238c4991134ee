"""What eager seams cost in vLLM's breakable CUDA graphs: the measurement that decides how extraction and
steering can run on a graph-captured engine (hooks re-entered at replay through ``add_eager``).

    python3 scratch/bench_graph_seams.py [--model random-1b] [--prompts 256] [--tokens 100] [--new 32]   (GPU machine)

Modes, each in a fresh process, vanilla vLLM (no nnsight, no nnterp): ``graphs`` (vLLM's default, compiled
piecewise graphs), ``eager``, ``breakable`` (``VLLM_USE_BREAKABLE_CUDAGRAPH=1``, no seam), ``seam-noop`` (a seam
after every decoder layer that does nothing), ``seam-read`` (a seam after every decoder layer that copies the
layer's hidden rows into a static buffer), ``seam-one`` (``seam-read`` at one layer only), ``seam-steer`` (adds a
vector in place to one layer's hidden rows at every step). Prints tokens/s and
the ratio to ``graphs``; one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("graphs", "eager", "breakable", "seam-noop", "seam-read", "seam-one", "seam-steer")

try:
    from vllm.v1.worker.gpu_worker import Worker as _VLLMWorker
except Exception:  # imported without vLLM (e.g. to read the docstring)
    _VLLMWorker = object


class SeamWorker(_VLLMWorker):
    """vLLM's GPU worker with forward hooks on decoder layers that, while a breakable graph is recorded, register
    an eager callable replayed at that point of every step (``NNTERP_SEAMS``: noop, read or one)."""

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        import torch
        from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphCapture
        from vllm.utils.torch_utils import weak_ref_tensor

        kind = os.environ["NNTERP_SEAMS"]
        model = self.model_runner.model  # the raw model: graphs wrap it only when captured
        layers = model.model.layers
        hidden = model.config.hidden_size
        rows = self.vllm_config.scheduler_config.max_num_batched_tokens
        dtype = next(model.parameters()).dtype
        chosen = range(len(layers)) if kind in ("noop", "read") else [len(layers) // 2]
        buffers = {index: torch.empty(rows, hidden, dtype=dtype, device="cuda") for index in chosen} if kind in ("read", "one") else {}
        vector = torch.full((hidden,), 1e-3, dtype=dtype, device="cuda")

        self.seams = {"recorded": 0, "served": 0}

        def serve(index, live):
            self.seams["served"] += 1
            if kind == "steer":
                live.add_(vector)
            elif index in buffers:
                buffers[index][: live.shape[0]].copy_(live)

        for index in chosen:
            def hook(module, args, output, index=index):
                live = output[0] if isinstance(output, tuple) else output
                capture = BreakableCUDAGraphCapture.current()
                if capture is not None and capture._capturing:
                    weak = weak_ref_tensor(live)
                    capture.add_eager(lambda: serve(index, weak))
                    self.seams["recorded"] += 1
                else:
                    serve(index, live)
                return output

            layers[index].register_forward_hook(hook)

    def seam_counts(self) -> dict:
        return getattr(self, "seams", {})


def measure(args) -> dict:
    from vllm import LLM, SamplingParams

    sys.path.insert(0, str(HERE))
    from bench_throughput import make_prompts, model_path

    with tempfile.TemporaryDirectory() as cache:
        path = model_path(args.model, Path(os.environ.get("NNTERP_BENCH_CACHE", cache)))
        settings = {"max_model_len": 1024, "max_num_seqs": 256, "max_num_batched_tokens": 32768,
                    "enable_prefix_caching": False, "dtype": "bfloat16", "enforce_eager": args.mode == "eager",
                    **json.loads(os.environ.get("NNTERP_VLLM_ARGS", "{}"))}
        if args.mode.startswith("seam"):
            settings["worker_cls"] = "bench_graph_seams.SeamWorker"
        llm = LLM(path, **settings)
        prompts = make_prompts(llm.get_tokenizer(), args.prompts, args.tokens)
        params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:8], params, use_tqdm=False)  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            seconds.append(time.perf_counter() - start)
        best = min(seconds)
        seams = llm.collective_rpc("seam_counts")[0] if args.mode.startswith("seam") else {}
        return {"seams": seams, "mode": args.mode, "model": args.model, "prompts": args.prompts, "prompt_tokens": args.tokens,
                "new_tokens": args.new, "seconds": round(best, 4),
                "tokens_per_s": round(args.prompts * (args.tokens + args.new) / best, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-1b")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return
    results = {}
    for mode in args.modes.split(","):
        env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        if mode not in ("graphs", "eager"):
            env["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"
        if mode.startswith("seam"):
            env["NNTERP_SEAMS"] = mode.removeprefix("seam-")
        command = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--prompts", str(args.prompts),
                   "--tokens", str(args.tokens), "--new", str(args.new), "--repeats", str(args.repeats)]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        line = next((line for line in run.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode}: failed\n{run.stderr[-2500:]}", flush=True)
            continue
        results[mode] = json.loads(line[len("RESULT "):])
        print(json.dumps(results[mode]), flush=True)
    base = results.get("graphs", {}).get("tokens_per_s")
    for mode, record in results.items():
        ratio = f"{record['tokens_per_s'] / base:.2f}" if base else "-"
        print(f"{mode:10} {record['tokens_per_s']:>10.0f} tokens/s   {ratio} x graphs")


if __name__ == "__main__":
    main()
