"""vLLM's CPU engine under tensor and pipeline parallelism (one core per rank) against one rank: every
accessor on 3 prompts, the logit lens, a steered next-token distribution, arithmetic across the first and
last layer consumed inside the trace, greedy generations (plain and steered at every step), and extraction
(each stage captures its own layers)."""

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from harness.equivalence import compare_reads  # noqa: E402
from harness.parallel import parallel_reads  # noqa: E402

CHECKED = {"layers_output", "attentions_input", "mlps_output", "token_embeddings", "next_token_probs", "logit_lens",
           "steered_probs", "unembedding_steered_probs", "norm_ratio", "generation_plain", "generation_steered",
           "extracted_layers_output", "extracted_attentions_input"}


@pytest.fixture(scope="module")
def one_rank(tiny_path):
    path = str(tiny_path("llama"))
    return path, parallel_reads(path, 1, 1)


def test_reads_are_meaningful(one_rank):
    """The reference itself: steering changed the generation, and the norm ratio is a real number."""
    _, reads = one_rank
    assert not torch.equal(reads[0]["generation_plain"][0], reads[0]["generation_steered"][0])
    assert not torch.allclose(reads[0]["unembedding_steered_probs"][0], reads[0]["next_token_probs"][0], atol=1e-4)
    assert all(torch.isfinite(prompt["norm_ratio"][0]).all() and prompt["norm_ratio"][0].item() > 0 for prompt in reads)


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_engine_equals_one_rank(one_rank, tp, pp):
    path, reference = one_rank
    diffs = compare_reads(reference, parallel_reads(path, tp, pp))
    assert CHECKED <= set(diffs)
    assert all(diff["abs"] <= 1e-4 for diff in diffs.values()), diffs
