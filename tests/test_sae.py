"""Splicing a hand-made sparse autoencoder against a forward hook on the raw model that does the same by hand."""

import pytest
import torch

from nnterp.interventions import splice

PROMPTS = ["The capital of France is", "Hi"]


class TinySAE(torch.nn.Module):
    def __init__(self, width: int, features: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.W_enc = torch.nn.Parameter(torch.randn(width, features, generator=generator) / width ** 0.5)
        self.W_dec = torch.nn.Parameter(torch.randn(features, width, generator=generator) / features ** 0.5)
        self.b_enc = torch.nn.Parameter(torch.randn(features, generator=generator) * 0.1)
        self.b_dec = torch.nn.Parameter(torch.randn(width, generator=generator) * 0.1)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def hooked_logits(model, layer, replace):
    raw_layer = model._torch_module("layers")[layer]

    def hook(module, args, output):
        stream = output[0] if isinstance(output, tuple) else output
        new = replace(stream)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = raw_layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model._module(**model.tokenizer(PROMPTS, return_tensors="pt", padding=True)).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("include_error", [False, True])
def test_splice_and_feature_edits_equal_a_manual_hook(llama, include_error):
    sae = TinySAE(llama.hidden_size)
    with torch.no_grad(), llama.trace(PROMPTS):
        spliced = splice(llama, "layers_output", 1, sae, include_error=include_error)
        features = spliced.features.save()
        logits = llama.logits.save()
    with torch.no_grad(), llama.trace(PROMPTS):
        edited = splice(llama, "layers_output", 1, sae, include_error=include_error)
        changed = edited.features.clone()
        changed[..., 3] = 5.0
        edited.features = changed
        edited_logits = llama.logits.save()

    def manual(stream, edit=None):
        with torch.no_grad():
            f = sae.encode(stream)
            error = stream - sae.decode(f)
            if edit is not None:
                f = f.clone()
                f[..., 3] = 5.0
            return sae.decode(f) + (error if include_error else 0)

    assert torch.allclose(logits, hooked_logits(llama, 1, manual), atol=1e-5)
    assert torch.allclose(edited_logits, hooked_logits(llama, 1, lambda s: manual(s, edit=True)), atol=1e-5)
    assert features.shape[-1] == 16 and (features >= 0).all()
    if include_error:  # the reconstruction plus its error is the stream itself
        with torch.no_grad():
            plain = llama._module(**llama.tokenizer(PROMPTS, return_tensors="pt", padding=True)).logits
        assert torch.allclose(logits, plain, atol=1e-5)


def test_splice_refuses_what_it_cannot_use(llama):
    with pytest.raises(TypeError, match="no encode/decode"), llama.trace("Hi"):
        splice(llama, "layers_output", 0, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="width must be the model's hidden size"), llama.trace("Hi"):
        splice(llama, "layers_output", 0, TinySAE(llama.hidden_size * 2))
