"""``python -m nnterp.demo``: the standardized surface on SmolLM2-135M-Instruct (shipped by a PyPI wheel)."""

from __future__ import annotations

import warnings

import torch

from .standardized import StandardizedTransformer
from .testing.smollm2 import smollm2_path
from .validation import validate


def main() -> None:
    warnings.filterwarnings("ignore")
    model = StandardizedTransformer(str(smollm2_path()))
    print(f"{model.layout.architecture}: {model.num_layers} layers, hidden {model.hidden_size}, "
          f"{model.num_heads} heads, vocab {model.vocab_size}")
    print("standard names ->", model.names.as_dict())

    prompt = "The capital of France is"
    streams = []  # created outside the trace: only saved values and outer objects leave a trace
    with torch.no_grad(), model.trace(prompt):
        for i in range(model.num_layers):
            streams.append(model.layers_output[i].save())
        probs = model.next_token_probs.save()
    top = probs[0].topk(3)
    print(f"\n{prompt!r} ->", [(model.tokenizer.decode(int(t)), round(float(p), 3)) for p, t in zip(top.values, top.indices)])

    print("\nlogit lens (top token at the last position, every 5th layer):")
    for layer in range(0, model.num_layers, 5):
        token = model.project_on_vocab(streams[layer][0, -1]).argmax()
        print(f"  layer {layer:2}: {model.tokenizer.decode(int(token))!r}")

    direction = model._torch_module("lm_head").weight[model.tokenizer.encode(" London")[0]].detach()
    with torch.no_grad(), model.trace(prompt):
        model.steer(layers=list(range(10, 20)), steering_vector=direction, factor=4.0)
        steered = model.next_token_probs.save()
    print("\nsteering layers 10-19 towards ' London' ->", repr(model.tokenizer.decode(int(steered[0].argmax()))))

    print("\n" + str(validate(model)))


if __name__ == "__main__":
    main()
