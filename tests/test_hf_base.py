"""StandardizedTransformer on nnsight's current base class (TransformersModel, not the deprecated LanguageModel),
with what nnterp 1.3 code relies on: the nnsight model type, the tokenizer and its settings, and ``trace`` /
``generate`` taking prompts, checked against plain HF."""

import warnings

import torch
from nnsight.intervention.envoy import Envoy
from nnsight.modeling.transformers import TransformersModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from nnterp import StandardizedTransformer


def test_built_on_transformers_model_without_deprecation_warnings(tiny_path):
    path = str(tiny_path("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nnsight warns when its deprecated LanguageModel is constructed
        model = StandardizedTransformer(path, tokenizer_kwargs={"padding_side": "right"})
    assert isinstance(model, TransformersModel) and isinstance(model, Envoy)
    assert model.tokenizer.padding_side == "right"  # tokenizer_kwargs applied, as nnterp 1.3 did through nnsight


def test_trace_and_generate_take_prompts_as_nnterp_1_3_code_passes_them(tiny_path):
    path = str(tiny_path("llama"))
    model = StandardizedTransformer(path)
    reference = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected_logits = reference(ids).logits
        expected_tokens = reference.generate(ids, max_new_tokens=4, do_sample=False,
                                             pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:]
    with torch.no_grad(), model.trace([prompt]):
        logits = model.logits.save()
    torch.testing.assert_close(logits, expected_logits)
    with torch.no_grad(), model.generate(prompt, max_new_tokens=4, do_sample=False) as tracer:
        output = tracer.result.save()
    assert output[0, ids.shape[1]:].tolist() == expected_tokens.tolist()
