"""StandardizedVLLM on CUDA graphs (``cuda_graphs=True``) against the eager engine on the same weights, on one GPU.
On the device machine, after the payload of ``scratch/device_wheelhouse.py``:

    export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_WORKER_MULTIPROC_METHOD=spawn
    python3 scratch/gpu_graphs.py [--out graphs.json] [--atol 1e-4]

A tiny random Llama in float32; every engine runs in a fresh process and its values come back through a file:

1. every layer accessor, the token embeddings, next-token probabilities, the logit lens, steering, steered greedy
   generation and extraction of single prompts (``tests/harness/parallel.dump_reads``);
2. the seven intervention patterns (``tests/harness/patterns``), in one forward pass and over 8 generated tokens;
3. several prompts at once over 8 generated tokens (decode batches padded up to a captured graph size): extraction
   of every accessor, and served requests (the ``nnterp`` object of the server, offline) that steer at every step
   and capture two layers; plus the seams the engine recorded into its graphs.

Prints the differences per item and exits 1 when a value differs by more than ``--atol`` (section 3's extraction:
``--rtol`` of its largest value) or a token differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.parallel import engine_program_in_fresh_process  # noqa: E402
from harness.patterns import classify  # noqa: E402

PROMPTS = ("The capital of France is", "Hi", "One two three four five six seven eight nine ten eleven twelve",
           "A cat", "Le chat est noir. Der Hund ist braun. El perro es grande.", "Paris")
STEPS = 8


def dump_batch(path: str, out: str, tp: int, pp: int, engine: dict | None = None) -> None:
    """Section 3 in this process: several requests per engine step, generating."""
    from safetensors.torch import load
    from vllm import SamplingParams

    from nnterp.backends.taps.spec import ACCESSORS, Capture, RequestSpec, Steer
    from nnterp.standardized.vllm import StandardizedVLLM

    model = StandardizedVLLM(path, dtype="float32", max_model_len=256, max_num_seqs=8, check_layout=False,
                             **(engine or {}))
    extracted = [{name: activations[name] for name in ACCESSORS}
                 for activations in model.extract(list(PROMPTS), accessors=ACCESSORS, max_new_tokens=STEPS,
                                                  ignore_eos=True, progress=False)]
    vector = (torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)) * 4).tolist()
    last = model.num_layers - 1
    params = []
    for index in range(len(PROMPTS)):
        spec = RequestSpec(steer=[Steer([model.num_layers // 2], vector, 1.0, "all")],
                           capture=[Capture("layers_output", [0, last], "all")], handle=f"graphs-{index}")
        params.append(SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True,
                                     extra_args={"nnterp": spec.to_json()}))
    engine_outputs = model.vllm_entrypoint.generate(list(PROMPTS), params, use_tqdm=False)
    served = []
    for index, output in enumerate(engine_outputs):
        taken = model.vllm_entrypoint.collective_rpc("nnterp_take", args=(f"graphs-{index}",))[0]
        captures = load(taken["captures"]) if taken["captures"] else {}
        served.append({"tokens": list(output.outputs[0].token_ids), "error": taken["error"], **captures})
    seams = model.vllm_entrypoint.collective_rpc("nnterp_seams")
    torch.save({"extracted": extracted, "served": served, "seams": seams}, out)


def worst_difference(reference, candidate) -> float:
    if isinstance(reference, torch.Tensor):
        if reference.shape != candidate.shape:
            return float("inf")
        return float((reference.float() - candidate.float()).abs().max()) if reference.numel() else 0.0
    if isinstance(reference, dict):
        return max((worst_difference(reference[key], candidate.get(key)) for key in reference), default=0.0)
    if isinstance(reference, (list, tuple)):
        if len(reference) != len(candidate):
            return float("inf")
        return max((worst_difference(a, b) for a, b in zip(reference, candidate)), default=0.0)
    return 0.0 if reference == candidate else float("inf")


def magnitude(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.float().abs().max()) if value.numel() else 0.0
    if isinstance(value, dict):
        return max((magnitude(item) for item in value.values()), default=0.0)
    if isinstance(value, (list, tuple)):
        return max((magnitude(item) for item in value), default=0.0)
    return 0.0


def run(program: str, path: str, workdir: str, engine: dict) -> object:
    out = str(Path(workdir) / f"{program}-{bool(engine)}.pt")
    if program == "batch":
        import subprocess

        code = (f"import sys; sys.path.insert(0, {str(ROOT / 'scratch')!r}); from gpu_graphs import dump_batch; "
                f"dump_batch({path!r}, {out!r}, 1, 1, {engine!r})")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
        if done.returncode:
            raise RuntimeError(done.stderr[-4000:])
        return torch.load(out, weights_only=False)
    return engine_program_in_fresh_process(program, out, 1, 1, path=path, engine=engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--rtol", type=float, default=1e-3, help="extraction of several prompts: relative to the largest value "
                        "(a decode batch padded to a graph's size takes other GEMM kernels than eager: 7.6e-5 measured; "
                        "a wrong row is off by the values' own size)")
    args = parser.parse_args()
    from nnterp.testing.tiny import build_tiny_model
    from nnterp.validation.vllm import compare_reads

    graphs = {"cuda_graphs": True}
    report: dict = {}
    with tempfile.TemporaryDirectory() as workdir:
        path = str(build_tiny_model("llama", Path(workdir) / "llama").path)
        reads = compare_reads(run("parallel.dump_reads", path, workdir, {}), run("parallel.dump_reads", path, workdir, graphs))
        report["reads"] = {name: entry["abs"] for name, entry in reads.items()}
        print("reads:", json.dumps(report["reads"]), flush=True)
        eager, tapped = (run("patterns.dump_patterns", path, workdir, engine) for engine in ({}, graphs))
        report["patterns"] = classify(eager["results"], tapped["results"], atol=args.atol)
        print("patterns:", json.dumps(report["patterns"]), flush=True)
        eager, tapped = (run("batch", path, workdir, engine) for engine in ({}, graphs))
        report["batch"] = {
            "extracted": worst_difference(eager["extracted"], tapped["extracted"]),
            "extracted_magnitude": magnitude(eager["extracted"]),
            "served_captures": worst_difference([{k: v for k, v in s.items() if k != "tokens"} for s in eager["served"]],
                                                [{k: v for k, v in s.items() if k != "tokens"} for s in tapped["served"]]),
            "served_tokens_equal": [s["tokens"] for s in eager["served"]] == [s["tokens"] for s in tapped["served"]],
            "served_errors": [s["error"] for s in tapped["served"]],
            "extracted_tokens": [int(e["layers_output"].shape[1]) for e in tapped["extracted"]],
            "seams": tapped["seams"], "eager_seams": eager["seams"],
        }
        print("batch:", json.dumps(report["batch"]), flush=True)
    failed = (any(value > args.atol for value in report["reads"].values())
              or any(verdict != "match" for verdict in report["patterns"].values())
              or report["batch"]["extracted"] > args.rtol * report["batch"]["extracted_magnitude"]
              or report["batch"]["served_captures"] > args.atol
              or not report["batch"]["served_tokens_equal"] or any(report["batch"]["served_errors"]))
    report["verdict"] = "differs" if failed else "equal"
    print(json.dumps({"verdict": report["verdict"]}))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
