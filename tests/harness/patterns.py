"""The seven intervention patterns a parallel engine must reproduce exactly as one rank does: a clean run,
reading every layer, reads split across stages, a value consumed across stages, a write on one stage made
of another stage's value, ablation, steering; each in one forward pass and over 8 generated tokens.

    python -m tests.harness.patterns <model path> [--tp 1] [--pp 2]   (from the repository root)

Each configuration runs in a fresh process (one engine per process); the values come back through a file.
After the patterns, a long generation that reads every layer at every step checks that the stages keep
nothing once it finishes (the worker's ``nnterp_stage_transport`` report).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from .parallel import engine_program_in_fresh_process

PATTERNS = ("clean", "read_every_layer", "read_split", "consume_across", "write_across", "ablate", "steer")
PROMPTS = ("The capital of France is", "One two three four five")
STEPS = 8
LONG_STEPS = 24


def _apply(model, pattern: str, saved, previous: list) -> None:
    """One forward pass (or one generation step) of ``pattern``; appends what it reads to ``saved``.
    ``previous`` carries a value from one generation step to the next (write_across)."""
    last = model.num_layers - 1
    if pattern == "read_every_layer":
        for layer in range(model.num_layers):
            saved.append(model.layers_output[layer])
    elif pattern == "read_split":
        saved.append(model.layers_output[0])
        saved.append(model.mlps_output[last])
    elif pattern == "consume_across":
        first, final = model.layers_output[0], model.layers_output[last]
        saved.append(torch.tensor((final.norm() / first.norm()).item()))
        saved.append(final - first)
    elif pattern == "write_across":
        if previous:  # the last layer of the step before, fed into layer 0 (the first stage) at this step
            model.layers_output[0] = model.layers_output[0] + 0.1 * previous[-1]
        direction = model.layers_output[1]  # the first stage's, on a pipeline of two
        model.layers_output[last] = model.layers_output[last] + 0.5 * direction
        previous.append(model.layers_output[last][-1])  # the step's last token
    elif pattern == "ablate":
        model.attentions_output[0] = model.attentions_output[0] * 0
        model.mlps_output[last] = model.mlps_output[last] * 0
    elif pattern == "steer":
        vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
        model.steer(layers=[0, last], steering_vector=vector, factor=4.0)
    saved.append(model.logits)


def _every_step(model, steps: int) -> dict:
    """Greedy sampling for exactly ``steps`` tokens (a random model may otherwise end at once)."""
    return {**model.greedy_generation_kwargs(steps), "stop_token_ids": [], "ignore_eos": True}


def run_pattern(model, pattern: str, prompt: str, generate: bool) -> dict[str, list[torch.Tensor]]:
    """Values of ``pattern`` on ``prompt``: what it reads and the logits (and, generating, the tokens)."""
    import nnsight

    with torch.no_grad():
        if not generate:
            with model.trace(prompt):
                saved = nnsight.save([])
                _apply(model, pattern, saved, [])
            return {"values": [value.detach().cpu().float() for value in saved]}
        with model.generate(prompt, **_every_step(model, STEPS)) as tracer:
            saved, tokens, previous = nnsight.save([]), nnsight.save([]), []
            for _ in tracer.iter[:]:
                _apply(model, pattern, saved, previous)
                tokens.append(model.step_token.item())
    return {"values": [value.detach().cpu().float() for value in saved], "tokens": [torch.tensor(list(tokens))]}


def stage_transport(model) -> list | None:
    """Each worker's transport report (None off pipeline parallelism)."""
    return model.vllm_entrypoint.llm_engine.collective_rpc("nnterp_stage_transport")


def long_generation(model) -> None:
    import nnsight

    with torch.no_grad(), model.generate(PROMPTS[0], **_every_step(model, LONG_STEPS)) as tracer:
        saved = nnsight.save([])
        for _ in tracer.iter[:]:
            for layer in range(model.num_layers):
                saved.append(model.layers_output[layer])
    assert len(saved) == LONG_STEPS * model.num_layers, len(saved)


def dump_patterns(path: str, out: str, tp: int, pp: int, engine: dict | None = None) -> None:
    """The patterns' values saved to ``out``; ``engine``: more engine arguments (e.g. ``cuda_graphs``)."""
    from nnterp.standardized.vllm import StandardizedVLLM

    model = StandardizedVLLM(path, dtype="float32", max_model_len=128, max_num_seqs=4, check_layout=False,
                             tensor_parallel_size=tp, pipeline_parallel_size=pp, **(engine or {}))
    results = {f"{pattern}/{'generate' if generate else 'forward'}/{index}": run_pattern(model, pattern, prompt, generate)
               for pattern in PATTERNS for generate in (False, True) for index, prompt in enumerate(PROMPTS)}
    transport = {"after_patterns": stage_transport(model)}
    for _ in range(2):
        long_generation(model)
        transport.setdefault("after_long_generations", []).append(stage_transport(model))
    torch.save({"results": results, "transport": transport}, out)


def patterns_in_fresh_process(path: str, tp: int, pp: int, engine: dict | None = None) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        out = str(Path(workdir) / f"patterns-tp{tp}-pp{pp}.pt")
        return engine_program_in_fresh_process("patterns.dump_patterns", out, tp, pp, path=path, engine=engine)


def classify(reference: dict, candidate: dict, atol: float = 1e-4) -> dict[str, str]:
    """Per pattern run: "match", or what differs (a missing run, another number of values, other tokens,
    the largest value difference)."""
    verdicts = {}
    for name, expected in reference.items():
        got = candidate.get(name)
        if got is None:
            verdicts[name] = "missing"
        elif len(got["values"]) != len(expected["values"]):
            verdicts[name] = f"{len(got['values'])} values, expected {len(expected['values'])}"
        elif "tokens" in expected and not torch.equal(got["tokens"][0], expected["tokens"][0]):
            verdicts[name] = f"tokens {got['tokens'][0].tolist()} != {expected['tokens'][0].tolist()}"
        else:
            worst = max((float((a - b).abs().max()) if a.shape == b.shape else float("inf"))
                        for a, b in zip(got["values"], expected["values"]))
            verdicts[name] = "match" if worst <= atol else f"max abs diff {worst:.3g}"
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=2)
    args = parser.parse_args()
    reference = patterns_in_fresh_process(args.model, 1, 1)
    candidate = patterns_in_fresh_process(args.model, args.tp, args.pp)
    print(json.dumps({"verdicts": classify(reference["results"], candidate["results"]),
                      "transport": candidate["transport"]}, indent=1, default=str))


if __name__ == "__main__":
    main()
