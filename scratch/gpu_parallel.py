"""vLLM on GPUs (device machine nvidia-h200-x2): TP=2 and PP=2 against one GPU, HF against vLLM, and the
buffer-aliasing check, on a tiny random Llama and SmolLM2-135M.

    export <scratch/device_wheelhouse.py's ENVIRONMENT>; python3 scratch/gpu_parallel.py [out.jsonl] [--parallel-only] [--only=tiny-llama|smollm2-135m]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the maintainers' harness

from harness.equivalence import RESULT_PREFIX as EQUIVALENCE_PREFIX  # noqa: E402
from harness.parallel import compare_reads, reads_in_fresh_process  # noqa: E402

LAYOUTS = {"tiny-llama": [(2, 1), (1, 2)], "smollm2-135m": [(1, 2)]}  # SmolLM2's 9 heads do not split over 2
TIMED_BODIES = ("nothing", "save layer 0", "save last layer", "consume last layer", "consume layer 0")


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
    for tp, pp in LAYOUTS[name]:
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

    code = ("import json; from nnterp.validation import check_vllm_against_hf; "
            f"print({EQUIVALENCE_PREFIX!r} + json.dumps(check_vllm_against_hf({path!r})))")
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

    from nnterp.core.backend import Backend
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


def trace_timings(path: str, pp: int, repeats: int = 20) -> dict[str, float]:
    """Median wall time of one trace (client side, ms) per body: under PP=2 layer 0 is the first stage's
    (which reports saves) and the last layer the second stage's (a cross-stage value: resolved from the
    store at collection when saved, fetched inside the trace when consumed)."""
    import statistics

    import nnsight

    from nnterp.standardized.vllm import StandardizedVLLM

    model = StandardizedVLLM(path, dtype="float32", max_model_len=128, check_layout=False, pipeline_parallel_size=pp)
    prompt = "The capital of France is"

    def body(kind: str) -> None:
        with torch.no_grad(), model.trace(prompt):
            if kind == "save layer 0":
                model.layers_output[0].save()
            elif kind == "save last layer":
                model.layers_output[-1].save()
            elif kind == "consume last layer":
                nnsight.save(model.layers_output[-1].norm().item())
            elif kind == "consume layer 0":
                nnsight.save(model.layers_output[0].norm().item())
            else:
                model.logits.save()

    medians = {}
    for kind in TIMED_BODIES:
        body(kind)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            body(kind)
            times.append((time.perf_counter() - start) * 1e3)
        medians[kind] = round(statistics.median(times), 2)
    return medians


def timing_record(name: str, path: str, pp: int) -> dict:
    import subprocess

    run = subprocess.run([sys.executable, __file__, "--timings", path, str(pp)], capture_output=True, text=True, timeout=600)
    lines = [line for line in run.stdout.splitlines() if line.startswith("timings ")]
    if not lines:
        return {"model": name, "check": f"trace ms pp{pp}", "error": run.stderr[-1500:]}
    return {"model": name, "check": f"trace ms pp{pp}", "median_ms": json.loads(lines[-1].removeprefix("timings "))}


def main() -> None:
    from nnterp.testing.smollm2 import smollm2_path
    from nnterp.testing.tiny import build_tiny_model

    parallel_only = "--parallel-only" in sys.argv
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    out = Path(arguments[0]) if arguments else None
    emit({"gpus": torch.cuda.device_count(), "device": torch.cuda.get_device_name(0)}, out)
    with tempfile.TemporaryDirectory() as workdir:
        models = {"tiny-llama": str(build_tiny_model("llama", Path(workdir) / "llama").path),
                  "smollm2-135m": str(smollm2_path())}
        only = [argument.removeprefix("--only=") for argument in sys.argv[1:] if argument.startswith("--only=")]
        for name, path in models.items():
            if only and name not in only:
                continue
            try:
                for record in parallel_records(name, path, workdir):
                    emit(record, out)
            except Exception:
                emit({"model": name, "error": traceback.format_exc()[-1500:]}, out)
            for pp in (1, 2):
                emit(timing_record(name, path, pp), out)
            if not parallel_only:
                emit(equivalence_record(name, path), out)
                emit(aliasing_record(name, path), out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--aliasing"]:
        print("aliasing", aliasing(sys.argv[2]), flush=True)
    elif sys.argv[1:2] == ["--timings"]:
        print("timings " + json.dumps(trace_timings(sys.argv[2], int(sys.argv[3]))), flush=True)
    else:
        main()
