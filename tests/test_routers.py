"""routers_output and experts_chosen against hooks on the raw HF router, each prompt alone; vLLM against HF."""

import pytest
import torch

from nnterp import StandardizedTransformer

PROMPTS = ["The capital of France is", "Hi"]


def raw_router(model, layer, prompt):
    """``(logits, outputs)`` of the raw router module on one unpadded prompt: logits computed by hand from the
    router's input and weight, and its output entries as returned."""
    block = model.mlps[layer]._module
    router = next(getattr(block, n) for n in ("router", "gate") if hasattr(block, n))
    linear = router if getattr(router, "weight", None) is not None else next(c for c in router.children() if isinstance(c, torch.nn.Linear))
    seen = {}
    handle = router.register_forward_hook(lambda m, args, out: seen.update(input=args[0], output=out))
    try:
        with torch.no_grad():
            model._module(**model.tokenizer(prompt, return_tensors="pt"))
    finally:
        handle.remove()
    hidden = seen["input"].reshape(-1, seen["input"].shape[-1])
    logits = hidden @ linear.weight.T + (linear.bias if getattr(linear, "bias", None) is not None else 0)
    output = seen["output"] if isinstance(seen["output"], tuple) else (seen["output"],)
    return logits, output


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "llama4_text", "dbrx", "afmoe", "deepseek_v3"])
def test_router_logits_equal_the_raw_router_on_each_prompt_alone(tiny_path, model_type):
    model = StandardizedTransformer(str(tiny_path(model_type)))
    layer = model.num_layers - 1
    with torch.no_grad(), model.trace(PROMPTS):
        logits = model.routers_output[layer].save()
        mask = model.trace_attention_mask().save()
    assert logits.shape[:2] == mask.shape
    for row, prompt in enumerate(PROMPTS):
        expected, outputs = raw_router(model, layer, prompt)
        assert torch.allclose(logits[row][mask[row].bool()], expected, atol=1e-5)
        indices = [o for o in outputs if isinstance(o, torch.Tensor) and not o.is_floating_point()]
        if indices and indices[0].ndim == 2:
            with torch.no_grad(), model.trace(prompt):
                chosen = model.experts_chosen(layer).save()
            assert torch.equal(chosen[0], indices[0])


def test_dense_layers_and_writes_are_refused(tiny_path, llama):
    with pytest.raises(ValueError, match="it is a dense layer"), llama.trace("Hi"):
        llama.routers_output[0]
    deepseek = StandardizedTransformer(str(tiny_path("deepseek_v3")))  # its first layer is dense
    with pytest.raises(ValueError, match="layer 0's MLP .* has no router"), deepseek.trace("Hi"):
        deepseek.routers_output[0]
    mixtral = StandardizedTransformer(str(tiny_path("mixtral")))
    with pytest.raises(TypeError, match="read-only"), mixtral.trace("Hi"):
        mixtral.routers_output[0] = torch.zeros(1)
    dbrx = StandardizedTransformer(str(tiny_path("dbrx")))
    with pytest.raises(ValueError, match="does not return the experts it chose"), dbrx.trace("Hi"):
        dbrx.experts_chosen(0)


def test_routers_that_cannot_be_read_are_named(tiny_path):
    mixtral = StandardizedTransformer(str(tiny_path("mixtral")))
    accessor, hidden = mixtral.routers_output, torch.randn(5, mixtral.hidden_size)
    router = torch.nn.Linear(mixtral.hidden_size, 4, bias=False)
    with pytest.raises(ValueError, match="none of the router's outputs .* is its linear map of its input"):
        accessor._logits(router, hidden, (router(hidden).softmax(-1),), "model.routers_output[0]")
    narrow = torch.nn.Linear(mixtral.hidden_size, 3, bias=False)
    with pytest.raises(ValueError, match="the router returns width 3, the config has 4 experts"):
        accessor._logits(narrow, hidden, (narrow(hidden),), "model.routers_output[0]")
