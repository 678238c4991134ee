"""vLLM on GPUs (device machine nvidia-h200-x2): TP=2 and PP=2 against one GPU, HF against vLLM, and the
buffer-aliasing check, on a tiny random Llama and SmolLM2-135M.

    export <scratch/device_wheelhouse.py's ENVIRONMENT>; python3 scratch/gpu_parallel.py [out.jsonl]

vLLM must be installed there first (scratch/device_wheelhouse.py). Every engine runs in a fresh process;
each result is printed as one JSON line (and appended to ``out.jsonl``) as soon as it exists, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from nnterp.testing.equivalence import RESULT_PREFIX as EQUIVALENCE_PREFIX
from nnterp.testing.parallel import compare_reads, reads_in_fresh_process

LAYOUTS = [(2, 1), (1, 2)]


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as handle:
            handle.write(line + "\n")


def parallel_records(name: str, path: str, workdir: str):
    start = time.time()
    single = reads_in_fresh_process(path, 1, 1, workdir)
    yield {"model": name, "check": "tp1", "seconds": round(time.time() - start, 1)}
    for tp, pp in LAYOUTS:
        start = time.time()
        record = {"model": name, "check": f"tp{tp}-pp{pp} vs tp1"}
        try:
            diffs = compare_reads(single, reads_in_fresh_process(path, tp, pp, workdir))
            record["max_abs_diff"] = {key: diff["abs"] for key, diff in diffs.items()}
            record["max_rel_diff"] = {key: diff["rel"] for key, diff in diffs.items()}
        except Exception as error:  # report and go on to the next layout
            record["error"] = str(error)[-1500:]
        record["seconds"] = round(time.time() - start, 1)
        yield record


def equivalence_record(name: str, path: str) -> dict:
    """HF (on CPU, float32) against vLLM on one GPU, in a fresh process."""
    import subprocess

    code = ("import json; from nnterp.testing.equivalence import check_vllm_architecture, RESULT_PREFIX; "
            f"print(RESULT_PREFIX + json.dumps(check_vllm_architecture({path!r})))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    line = next((line for line in run.stdout.splitlines() if line.startswith(EQUIVALENCE_PREFIX)), None)
    if line is None:
        return {"model": name, "check": "hf vs vllm", "error": run.stderr[-1500:]}
    result = json.loads(line.removeprefix(EQUIVALENCE_PREFIX))
    result.pop("layout", None)
    return {"model": name, "check": "hf vs vllm", **result}


def aliasing(path: str) -> float:
    """max |saved reference - value at read time| of embed_tokens' output when the read is not cloned."""
    import nnsight

    from nnterp.standardized.base import Backend
    from nnterp.standardized.vllm import StandardizedVLLM

    model = StandardizedVLLM(path, dtype="float32", max_model_len=128, check_layout=False)
    model._backend = Backend()  # what the clone policy prevents
    with torch.no_grad(), model.trace("The capital of France is"):
        reference = nnsight.save(model.embed_tokens.output)  # the engine's buffer itself
        snapshot = model.embed_tokens.output.clone().save()
    return (reference - snapshot).abs().max().item()


def aliasing_record(name: str, path: str) -> dict:
    import subprocess

    run = subprocess.run([sys.executable, __file__, "--aliasing", path], capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("aliasing ")]
    if not lines:
        return {"model": name, "check": "aliasing without clone", "error": run.stderr[-1500:]}
    return {"model": name, "check": "aliasing without clone", "max_abs_drift": float(lines[-1].split()[1])}


def main() -> None:
    from nnterp.testing.smollm2 import smollm2_path
    from nnterp.testing.tiny import build_tiny_model

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    emit({"gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0)}, out)
    with tempfile.TemporaryDirectory() as workdir:
        models = {"tiny-llama": str(build_tiny_model("llama", Path(workdir) / "llama").path),
                  "smollm2-135m": str(smollm2_path())}
        for name, path in models.items():
            try:
                for record in parallel_records(name, path, workdir):
                    emit(record, out)
            except Exception:
                emit({"model": name, "error": traceback.format_exc()[-1500:]}, out)
            emit(equivalence_record(name, path), out)
            emit(aliasing_record(name, path), out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--aliasing"]:
        print("aliasing", aliasing(sys.argv[2]), flush=True)
    else:
        main()
