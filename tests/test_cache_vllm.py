"""run_with_cache, heads_output and head_results on vLLM's CPU engine against hooks on the raw HF model (each
prompt alone) on the same weights."""

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from test_cache import NAMES, PROMPTS, raw_reads  # noqa: E402


def test_vllm_cache_equals_each_prompt_alone_on_hf(pair):
    hf, vllm_model = pair
    logits, cache = vllm_model.run_with_cache(PROMPTS, names=NAMES)
    hf_logits, hf_cache = hf.run_with_cache(PROMPTS, names=NAMES)
    assert torch.equal(cache.attention_mask, hf_cache.attention_mask)
    assert torch.equal(cache.input_ids, hf_cache.input_ids)
    for row, prompt in enumerate(PROMPTS):
        reference = raw_reads(hf, prompt)
        real = cache.attention_mask[row].bool()
        assert torch.allclose(logits[row][real], reference["logits"], atol=1e-4)
        for index in range(hf.num_layers):
            for name in ("attentions_output", "mlps_output", "layers_output"):
                assert torch.allclose(cache.per_prompt(name, index)[row], reference[name, index], atol=1e-4), (name, index)
            assert torch.allclose(cache.per_prompt("heads_output", index)[row].flatten(-2), reference["o_proj_input", index],
                                  atol=1e-4)
    assert torch.allclose(logits, hf_logits, atol=1e-4)
    for name in ("accumulated_resid", "decompose_resid", "stack_head_results"):
        assert torch.allclose(getattr(cache, name)(apply_ln=True), getattr(hf_cache, name)(apply_ln=True), atol=1e-4), name
    tokens = hf_logits[:, -1].argmax(-1)
    assert torch.allclose(cache.logit_attrs(cache.decompose_resid(apply_ln=True), tokens),
                          hf_cache.logit_attrs(hf_cache.decompose_resid(apply_ln=True), tokens), atol=1e-4)


def test_vllm_head_ablation_equals_hf(pair):
    hf, vllm_model = pair
    results = {}
    for name, model in (("hf", hf), ("vllm", vllm_model)):
        with torch.no_grad(), model.trace(PROMPTS[0]):
            heads = model.heads_output[1]
            ablated = heads.clone()
            ablated[..., 0, :] = 0
            model.heads_output[1] = ablated
            per_head = model.project_heads(1, ablated).save() if name == "hf" else None
            stream = model.as_batch(model.layers_output[-1]).save()
        results[name] = (per_head, stream)
    assert torch.allclose(results["hf"][1], results["vllm"][1], atol=1e-4)
    assert not results["hf"][0][..., 0, :].any()
    with pytest.raises(RuntimeError, match="keeps no plain weight on this engine"), vllm_model.trace(PROMPTS[0]):
        vllm_model.head_results(0)
    with vllm_model.trace(PROMPTS[0]):  # the engine serves the next trace
        after = vllm_model.layers_output[0].save()
    assert after.shape[-1] == hf.hidden_size


def spliced_run(model, sae):
    """A splice with a feature edit on one prompt: the features and the last layer's stream (a function of its
    own, so no other model sits in the frame a vLLM trace ships to its engine)."""
    from nnterp.interventions import splice

    with torch.no_grad(), model.trace(PROMPTS[0]):
        spliced = splice(model, "layers_output", 1, sae, include_error=True)
        features = spliced.features.clone()
        features[..., 2] = 3.0
        spliced.features = features
        saved = model.as_batch(spliced.features).save()
        stream = model.as_batch(model.layers_output[-1]).save()
    return saved, stream


def test_vllm_splice_equals_hf(pair):
    from test_sae import TinySAE

    hf, vllm_model = pair
    sae = TinySAE(hf.hidden_size)
    streams = {name: spliced_run(model, sae) for name, model in (("hf", hf), ("vllm", vllm_model))}
    assert torch.allclose(streams["hf"][0], streams["vllm"][0], atol=1e-4)
    assert torch.allclose(streams["hf"][1], streams["vllm"][1], atol=1e-4)
