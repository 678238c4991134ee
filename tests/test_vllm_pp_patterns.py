"""The seven intervention patterns (tests/harness/patterns.py) on vLLM's CPU engine at PP=2, TP=2 and
PP=2 x TP=2 (four ranks), compared value by value with one rank, in one forward pass and over 8 generated
tokens; and what the pipeline stages hold for each other once requests finish."""

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from harness.patterns import LONG_STEPS, PATTERNS, classify, patterns_in_fresh_process  # noqa: E402


@pytest.fixture(scope="module")
def path(tiny_path):
    return str(tiny_path("llama"))


@pytest.fixture(scope="module")
def one_rank(path):
    return patterns_in_fresh_process(path, 1, 1)


@pytest.fixture(scope="module")
def pp2(path):
    return patterns_in_fresh_process(path, 1, 2)


def test_the_patterns_change_what_they_should(one_rank):
    """The reference itself: each write changes the logits of the clean run, and reads return real values."""
    results = one_rank["results"]
    for mode in ("forward", "generate"):
        clean = results[f"clean/{mode}/0"]["values"][-1]
        for pattern in ("write_across", "ablate", "steer"):
            assert not torch.allclose(results[f"{pattern}/{mode}/0"]["values"][-1], clean, atol=1e-3), (pattern, mode)
    assert len(results["read_every_layer/generate/0"]["values"]) == 8 * (3 + 1)  # 3 layers and the logits, 8 steps
    assert results["steer/generate/0"]["tokens"][0].tolist() != results["clean/generate/0"]["tokens"][0].tolist()


def test_pipeline_of_two_reproduces_every_pattern(one_rank, pp2):
    verdicts = classify(one_rank["results"], pp2["results"])
    assert len(verdicts) == len(PATTERNS) * 2 * 2 and set(verdicts.values()) == {"match"}, verdicts


@pytest.mark.parametrize("tp, pp", [(2, 1), (2, 2)], ids=["tp2", "pp2xtp2"])
def test_tensor_parallel_engines_reproduce_every_pattern(one_rank, path, tp, pp):
    verdicts = classify(one_rank["results"], patterns_in_fresh_process(path, tp, pp)["results"])
    assert set(verdicts.values()) == {"match"}, verdicts


def test_stages_split_the_layers_the_patterns_cross(pp2):
    """write_across reads layer 1 and writes the last layer: on different stages here."""
    stages = pp2["transport"]["after_patterns"]
    assert [stage["layers"] for stage in stages] == [[0, 2], [2, 3]]


def test_stages_hold_nothing_once_requests_finish(pp2):
    """Values published for other stages are freed when their request finishes, however many steps and
    layers it read: after the patterns and after each 24-step generation reading every layer."""
    reports = [pp2["transport"]["after_patterns"], *pp2["transport"]["after_long_generations"]]
    for report in reports:
        assert all(stage["held_values"] == 0 and stage["held_bytes"] == 0 and stage["open_requests"] == 0 for stage in report), report
    published = [[stage["published"] for stage in report] for report in reports]
    for before, after in zip(published, published[1:]):  # each long generation published every read of its stage's layers
        assert after[0] - before[0] >= LONG_STEPS * 2 and after[1] - before[1] >= LONG_STEPS, published
