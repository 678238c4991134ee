"""Every accessor, a logit-lens cell and a steering cell of StandardizedVLLM under tensor/pipeline
parallelism, compared with one rank.

    python -m tests.harness.parallel <model path or smollm2-135m> [--tp 2] [--pp 1]   (from the repository root)

Each engine runs in its own fresh process (one engine per process); reads travel back through a file.
On CPU, vLLM binds each worker's threads to its own cores: ``VLLM_CPU_OMP_THREADS_BIND`` defaults here to
one core per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .equivalence import PROMPTS, compare_reads, read_prompts

RESULT_PREFIX = "nnterp-parallel: "
EXTRACTED = ("layers_output", "attentions_input")  # read by model.extract too (all layers, prompts together)


def tool_reads(model, prompt: str) -> dict[str, list[torch.Tensor]]:
    """Helpers that read weights under TP (logit lens through the gathered LM head), steering writes (one
    along an LM-head row read inside the trace), arithmetic across the first and last layer (on a pipeline, values of two stages) consumed inside the
    trace, and greedy generations, plain and steered at every step."""
    import nnsight

    from nnterp.interventions import logit_lens
    from .equivalence import greedy_generations

    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(model.hidden_size, generator=generator) * 4
    with torch.no_grad(), model.trace(prompt):
        model.steer(layers=[model.num_layers // 2], steering_vector=vector)
        steered = model.next_token_probs.save()
    with torch.no_grad(), model.trace(prompt):  # a direction read from the (sharded / last stage's) LM head
        direction = model.parameter("lm_head.weight")[model.tokenizer.encode(" Paris", add_special_tokens=False)[0]]
        model.steer(layers=[model.num_layers - 1], steering_vector=direction, factor=4.0)
        unembedding_steered = model.next_token_probs.save()
    with torch.no_grad(), model.trace(prompt):
        first, last = model.layers_output[0], model.layers_output[-1]
        norm_ratio = nnsight.save((last.norm() / first.norm()).item())
    generations = greedy_generations(model, prompt, max_new_tokens=6)
    return {"logit_lens": [logit_lens(model, prompt).reshape(-1).cpu()], "steered_probs": [steered.reshape(-1).cpu()],
            "unembedding_steered_probs": [unembedding_steered.reshape(-1).cpu()], "norm_ratio": [torch.tensor([norm_ratio])],
            **{f"generation_{name}": [torch.tensor(tokens, dtype=torch.float32)] for name, tokens in generations.items()}}


def dump_reads(path: str, out: str, tp: int, pp: int, executor: str | None = None, engine: dict | None = None) -> None:
    """The reads of :data:`PROMPTS` saved to ``out``; ``engine``: more engine arguments (e.g. ``cuda_graphs``)."""
    from nnterp.standardized.vllm import StandardizedVLLM

    extra = {} if executor is None else {"distributed_executor_backend": executor}
    model = StandardizedVLLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, check_layout=False,
                             tensor_parallel_size=tp, pipeline_parallel_size=pp, **extra, **(engine or {}))
    reads = read_prompts(model)
    for prompt_reads, prompt in zip(reads, PROMPTS):
        prompt_reads.update(tool_reads(model, prompt))
    for prompt_reads, extracted in zip(reads, model.extract(list(PROMPTS), accessors=EXTRACTED, progress=False)):
        prompt_reads.update({f"extracted_{name}": list(extracted[name]) for name in EXTRACTED})
    torch.save(reads, out)


def engine_program_in_fresh_process(program: str, out: str, tp: int, pp: int, **arguments) -> Any:
    """``harness.<module>.<function>(out=..., tp=..., pp=..., **arguments)`` (``program`` is ``"module.function"``)
    in a fresh process, one engine per process; returns what it saved to ``out``. On CPU each rank gets a core
    of its own, ranks sharing cores when they outnumber them."""
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(rank % cores) for rank in range(tp * pp)))
    module, function = program.rsplit(".", 1)
    call = ", ".join(f"{name}={value!r}" for name, value in {"out": out, "tp": tp, "pp": pp, **arguments}.items())
    tests = str(Path(__file__).resolve().parents[1])
    code = f"import sys; sys.path.insert(0, {tests!r}); from harness.{module} import {function}; {function}({call})"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0:
        raise RuntimeError(f"{function} at tp={tp} pp={pp} {arguments} failed:\n{run.stderr[-4000:]}")
    return torch.load(out, weights_only=False)


def reads_in_fresh_process(path: str, tp: int, pp: int, workdir: str, executor: str | None = None) -> list[dict]:
    out = str(Path(workdir) / f"reads-tp{tp}-pp{pp}-{executor}.pt")
    return engine_program_in_fresh_process("parallel.dump_reads", out, tp, pp, path=path, executor=executor)


def parallel_reads(path: str, tp: int, pp: int, executor: str | None = None) -> list[dict]:
    """Every accessor and tool on :data:`PROMPTS` from an engine at (tp, pp) on vLLM's ``executor`` (None: its
    default), in a fresh process."""
    with tempfile.TemporaryDirectory() as workdir:
        return reads_in_fresh_process(path, tp, pp, workdir, executor)


def compare_parallel(path: str, tp: int = 2, pp: int = 1) -> dict[str, dict[str, float]]:
    """Max abs / relative differences per accessor between (tp, pp) and one rank (a generation of
    another length differs by inf)."""
    return compare_reads(parallel_reads(path, 1, 1), parallel_reads(path, tp, pp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    path = args.model
    if path == "smollm2-135m":
        from nnterp.testing.smollm2 import smollm2_path

        path = str(smollm2_path())
    print(RESULT_PREFIX + json.dumps(compare_parallel(path, args.tp, args.pp)))


if __name__ == "__main__":
    main()
