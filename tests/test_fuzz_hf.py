"""Differential fuzzing of StandardizedTransformer: a fixed-seed sample of random trace programs over tiny
models of different layouts (pre/post-norm, parallel attention+MLP, in-place parent updates, no MLP module,
ALiBi, soft-capping), each compared with forward hooks on the raw model and with each prompt run alone.
``python scratch/fuzz.py --cases N`` runs a longer sample (see ``tests/differential.py``)."""

import dataclasses

import pytest
import torch
from differential import HF_ARCHITECTURES, check_hf_case, make_case, summarize, surface_of

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


def test_fuzzer_finds_an_uncopied_in_place_edit(load):
    """With Falcon's MLP output read as the live tensor (the fix reverted), the sample reports mismatches on
    ``mlps_output`` reads and nothing else."""
    model, _ = load("falcon", torch.float32)
    key = "mlp:FalconMLP"
    layout = model.layout.modules[key]
    model.layout.modules[key] = dataclasses.replace(layout, output=dataclasses.replace(layout.output, edited_in_place=False))
    try:
        results = run_cases(load, "falcon", range(100, 108))
    finally:
        model.layout.modules[key] = layout
    found = [mismatch for _, mismatches, _ in results for mismatch in mismatches]
    assert found and all(mismatch.op.startswith("read mlps_output") for mismatch in found), summarize(results)


def test_fuzzer_finds_a_last_position_that_ignores_padding(load, monkeypatch):
    """With ``last_position`` taking the last column (the fix reverted), right-padded batches give mismatches on
    ``next_token_probs`` and nothing else."""
    import nnterp.standardized.base as base

    monkeypatch.setattr(base, "at_last_token", lambda tensor, mask: tensor[:, -1])
    results = run_cases(load, "llama", range(200, 212))
    found = [mismatch for _, mismatches, _ in results for mismatch in mismatches]
    assert found and all(mismatch.op == "read next_token_probs" and mismatch.case.padding_side == "right"
                         for mismatch in found), summarize(results)
