"""Differential fuzzing of StandardizedTransformer: a fixed-seed sample of random trace programs over tiny
models of different layouts (pre/post-norm, parallel attention+MLP, in-place parent updates, no MLP module,
ALiBi, soft-capping), each compared with forward hooks on the raw model and with each prompt run alone.
``python scratch/fuzz.py --cases N`` runs a longer sample (see ``tests/differential.py``)."""

import dataclasses

import pytest
import torch
from differential import (
    HF_ARCHITECTURES, check_cache_case, check_extraction_case, check_hf_case, check_hf_generation, make_case, summarize,
    surface_of,
)

from nnterp import StandardizedTransformer

CASES_PER_ARCHITECTURE = 4
SEED = 12


@pytest.fixture(scope="module")
def load(tiny_path):
    """(architecture, dtype) -> the model and its surface, loaded once."""
    loaded: dict = {}

    def get(architecture: str, dtype: torch.dtype):
        if (architecture, dtype) not in loaded:
            model = StandardizedTransformer(str(tiny_path(architecture)), check_layout=False, dtype=dtype)
            loaded[architecture, dtype] = model, surface_of(model)
        return loaded[architecture, dtype]

    return get


def run_cases(load, architecture: str, seeds) -> list:
    results = []
    for seed in seeds:
        case = make_case(seed, architecture, load(architecture, torch.float32)[1])
        found, worst = check_hf_case(load(architecture, case.dtype)[0], case)
        results.append((case, found, worst))
    return results


@pytest.mark.parametrize("architecture", HF_ARCHITECTURES)
def test_fuzz_sample_matches_references(load, architecture):
    results = run_cases(load, architecture, range(SEED * 1000, SEED * 1000 + CASES_PER_ARCHITECTURE))
    assert not any(found for _, found, _ in results), summarize(results)
    assert any(op["kind"] == "write" for case, _, _ in results for program in case.programs for op in program)


@pytest.mark.parametrize("architecture", HF_ARCHITECTURES)
def test_fuzz_generation_matches_each_prompt_alone(load, architecture):
    """Batched greedy generation (left and right padding, several invokes) gives each prompt the tokens of a
    plain decode loop on it alone, or is refused where padding would change them."""
    model, surface = load(architecture, torch.float32)
    cases = [make_case(seed, architecture, surface) for seed in range(SEED * 1000 + 50, SEED * 1000 + 54)]
    cases.append(dataclasses.replace(cases[0], prompts=cases[0].prompts[:1], invokes=[[0]]))  # nothing to pad
    checked = [(case, *check_hf_generation(model, case)) for case in cases]
    results = [(case, found, {}) for case, found, _ in checked]
    assert not any(found for _, found, _ in results), summarize(results)
    assert any(generated for _, _, generated in checked), "every case was refused: nothing was compared"


def test_fuzzer_finds_right_padded_generation(load, monkeypatch):
    """With the refusal of right-padded generation taken out, the fuzzer reports Pegasus (which pads on the
    right) continuing a shorter prompt after its padding."""
    import nnterp.backends.hf.batcher as batcher

    monkeypatch.setattr(batcher, "refuse_right_padded_generation", lambda mask, architecture, shifts: None)
    model, surface = load("pegasus", torch.float32)
    cases = cases_where(load, "pegasus", lambda case: case.padding_side == "right" and len(case.prompts) > 1, 3, start=60)
    results = [(case, check_hf_generation(model, case)[0], {}) for case in cases]
    assert all(found for _, found, _ in results), summarize(results)


def cases_where(load, architecture: str, wanted, count: int, start: int) -> list:
    """The first ``count`` cases from seed ``start`` on for which ``wanted(case)`` holds."""
    surface = load(architecture, torch.float32)[1]
    cases, seed = [], start
    while len(cases) < count:
        case = make_case(seed, architecture, surface)
        if wanted(case):
            cases.append(case)
        seed += 1
    return cases


def check(load, cases) -> list:
    return [(case, *check_hf_case(load(case.architecture, case.dtype)[0], case)) for case in cases]


def test_fuzzer_finds_an_uncopied_in_place_edit(load):
    """With Falcon's MLP output read as the live tensor (the fix taken out), every case that reads
    ``mlps_output`` reports it, and nothing else is reported."""
    def reads_mlp_output(case) -> bool:
        return any(op["kind"] == "read" and op["target"] == "mlps_output" for program in case.programs for op in program)

    cases = cases_where(load, "falcon", reads_mlp_output, 4, start=100)
    patched = []
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load("falcon", dtype)
        layout = model.layout.modules["mlp:FalconMLP"]
        model.layout.modules["mlp:FalconMLP"] = dataclasses.replace(
            layout, output=dataclasses.replace(layout.output, edited_in_place=False))
        patched.append((model, layout))
    try:
        results = check(load, cases)
    finally:
        for model, layout in patched:
            model.layout.modules["mlp:FalconMLP"] = layout
    assert all(found for _, found, _ in results), summarize(results)
    assert all(m.op.startswith("read mlps_output") for _, found, _ in results for m in found), summarize(results)


def test_fuzzer_finds_a_flattened_moe_output(load):
    """With Llama 4's MoE output taken as the module returns it, ``[batch * seq, hidden]`` (the fix taken out),
    every case that reads ``mlps_output`` reports it; the only other reports are logits downstream of an
    ``mlps_output`` write that reached another invoke's prompts."""
    def reads_mlp_output(case) -> bool:
        return any(op["kind"] == "read" and op["target"] == "mlps_output" for program in case.programs for op in program)

    cases = cases_where(load, "llama4_text", reads_mlp_output, 4, start=150)
    patched = []
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load("llama4_text", dtype)
        key = next(key for key in model.layout.modules if key.startswith("mlp:"))
        layout = model.layout.modules[key]
        assert layout.output.flat_tokens
        model.layout.modules[key] = dataclasses.replace(layout, output=dataclasses.replace(layout.output, flat_tokens=False))
        patched.append((model, key, layout))
    try:
        results = check(load, cases)
    finally:
        for model, key, layout in patched:
            model.layout.modules[key] = layout
    assert all(found for _, found, _ in results), summarize(results)
    allowed = ("read mlps_output", "read logits", "read next_token_probs")
    assert all(m.op.startswith(allowed) for _, found, _ in results for m in found), summarize(results)


def test_fuzzer_finds_a_last_position_that_ignores_padding(load, monkeypatch):
    """With ``last_position`` taking the last column (the fix taken out), every right-padded case whose
    next-token read covers a prompt shorter than the batch reports it, and nothing else is reported."""
    tokenizer = load("llama", torch.float32)[0].tokenizer

    def reads_a_padded_last_token(case) -> bool:
        lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in case.prompts]
        return case.padding_side == "right" and any(
            program[-1]["target"] == "next_token_probs" and min(lengths[i] for i in indices) < max(lengths)
            for indices, program in zip(case.invokes, case.programs))

    cases = cases_where(load, "llama", reads_a_padded_last_token, 4, start=200)
    import nnterp.standardized.base as base

    monkeypatch.setattr(base, "at_last_token", lambda tensor, mask: tensor[:, -1])
    results = check(load, cases)
    assert all(found for _, found, _ in results), summarize(results)
    assert all(m.op == "read next_token_probs" for _, found, _ in results for m in found), summarize(results)


def _steers_positions_of_a_padded_prompt(tokenizer):
    def wanted(case) -> bool:
        lengths = [len(tokenizer(prompt)["input_ids"]) for prompt in case.prompts]
        return any(
            op["kind"] == "steer" and op["positions"] is not None and min(lengths[i] for i in indices) < max(lengths)
            for indices, program in zip(case.invokes, case.programs) for op in program)
    return wanted


def test_fuzz_steering_positions_in_padded_batches(load):
    """Cases that steer chosen token positions of prompts padded in their batch (left and right) match the
    references, which index each prompt's own real tokens."""
    wanted = _steers_positions_of_a_padded_prompt(load("llama", torch.float32)[0].tokenizer)
    results = check(load, cases_where(load, "llama", wanted, 4, start=300))
    assert {case.padding_side for case, _, _ in results} == {"left", "right"}, "the sample must cover both sides"
    assert not any(found for _, found, _ in results), summarize(results)


def test_fuzzer_finds_steering_positions_that_count_padding(load, monkeypatch):
    """With steering positions counted over the padded batch (the fix taken out), the fuzzer reports cases
    that steer chosen positions of a padded prompt."""
    wanted = _steers_positions_of_a_padded_prompt(load("llama", torch.float32)[0].tokenizer)
    cases = cases_where(load, "llama", wanted, 4, start=300)
    import nnterp.standardized.base as base

    monkeypatch.setattr(base.StandardizedMixin, "_real_tokens", lambda self, shape: torch.ones(shape, dtype=torch.bool))
    results = check(load, cases)
    assert any(found for _, found, _ in results), summarize(results)


@pytest.mark.parametrize("architecture", HF_ARCHITECTURES)
def test_fuzz_run_with_cache_matches_each_prompt_alone(load, architecture):
    """run_with_cache of random prompt sets (left and right padding) holds each prompt's own values."""
    model, surface = load(architecture, torch.float32)
    results = []
    for seed in range(SEED * 1000 + 80, SEED * 1000 + 83):
        found, worst = check_cache_case(model, surface, make_case(seed, architecture, surface))
        results.append((make_case(seed, architecture, surface), found, {"alone": worst}))
    assert not any(found for _, found, _ in results), summarize(results)


@pytest.mark.parametrize("architecture", HF_ARCHITECTURES)
def test_fuzz_extraction_matches_each_prompt_alone(load, architecture):
    """model.extract (random accessors, layers, batch sizes, generated tokens) against hooks on the raw model
    run on each prompt's tokens alone, and its generated tokens against the raw model's greedy choice."""
    model, surface = load(architecture, torch.float32)
    cases = [make_case(seed, architecture, surface) for seed in range(SEED * 1000 + 80, SEED * 1000 + 83)]
    results = [(case, *check_extraction_case(model, model, surface, case)) for case in cases]
    assert not any(found for _, found, _ in results), summarize(results)
