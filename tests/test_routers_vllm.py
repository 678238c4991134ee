"""routers_output on vLLM's CPU engine equals HF's on the same weights (vLLM: a request's [tokens, experts])."""

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from engines import hf_and_vllm  # noqa: E402

PROMPTS = ["The capital of France is", "Hi"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_vllm_router_logits_equal_hf(tiny_path, model_type):
    with hf_and_vllm(tiny_path(model_type)) as (hf, vllm_model):
        layer = hf.num_layers - 1
        for prompt in PROMPTS:
            with torch.no_grad(), hf.trace(prompt):
                expected = hf.routers_output[layer].save()
            with torch.no_grad(), vllm_model.trace(prompt):
                logits = vllm_model.routers_output[layer].save()
            assert logits.shape == expected.shape[1:]
            assert torch.allclose(logits, expected[0], atol=1e-4)
        with pytest.raises(ValueError, match="does not return the experts it chose"), vllm_model.trace("Hi"):
            vllm_model.experts_chosen(layer)
        with vllm_model.trace("Hi"):  # the engine serves the next trace
            after = vllm_model.routers_output[layer].save()
        assert after.shape[-1] == expected.shape[-1]
