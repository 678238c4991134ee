"""vLLM's Ray executor under StandardizedVLLM on one GPU: every accessor, the logit lens, steering, extraction and
steered generation on a Ray-executed engine (a Ray head started here, in its own process) against the same engine
on vLLM's default executor. On the device machine, after the payload of ``scratch/device_wheelhouse.py``:

    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_WORKER_MULTIPROC_METHOD=spawn
    python3 scratch/gpu_ray.py [--tp 1] [--pp 1] [--out ray.json]

vLLM's CPU engine cannot run on the Ray executor (its CPU platform declares no Ray device), so this needs GPUs;
``--tp``/``--pp`` above 1 need as many GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.equivalence import compare_reads  # noqa: E402
from harness.parallel import parallel_reads  # noqa: E402

RAY = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from nnterp.testing.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as workdir:
        path = str(build_tiny_model("llama", Path(workdir) / "llama").path)
        reference = parallel_reads(path, args.tp, args.pp)
        port = free_port()
        started = subprocess.run([*RAY, "start", "--head", "--port", str(port), "--disable-usage-stats",
                                  "--include-dashboard=false"], capture_output=True, text=True, timeout=180)
        if started.returncode:
            raise SystemExit(f"ray start failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        try:
            on_ray = parallel_reads(path, args.tp, args.pp, executor="ray")
        finally:
            subprocess.run([*RAY, "stop", "--force"], capture_output=True, timeout=120)
    diffs = compare_reads(reference, on_ray)
    worst = max(diff["abs"] for diff in diffs.values())
    for name, diff in sorted(diffs.items()):
        print(f"{name:32} abs {diff['abs']:.2e}")
    print(f"ray executor vs default executor, tp={args.tp} pp={args.pp}: worst abs difference {worst:.2e} over "
          f"{len(diffs)} reads: {'PASS' if worst <= 1e-4 else 'FAIL'}")
    if args.out:
        args.out.write_text(json.dumps({"tp": args.tp, "pp": args.pp, "diffs": diffs, "worst": worst}, indent=1))


if __name__ == "__main__":
    main()
