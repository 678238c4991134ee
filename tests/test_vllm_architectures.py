"""A fixed sample of the vLLM sweep on the CPU engine, against StandardizedTransformer on the same weights: a
mixture of experts in this process (its expert weights are prepacked by the engine), and, one engine per
process, a layer that ignores its residual argument and a model that unembeds with its input embedding."""

import json
import subprocess
import sys

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from engines import hf_and_vllm  # noqa: E402

from harness.equivalence import PROMPTS, RESULT_PREFIX, compare, within_tolerance  # noqa: E402

TESTS = Path(__file__).resolve().parent  # the harness runs from here (`python -m harness...`)


@pytest.fixture(scope="module")
def moe_pair(tiny_path):
    with hf_and_vllm(tiny_path("mixtral")) as models:
        yield models


def test_moe_every_accessor_equals_hf(moe_pair):
    """The meta tree is built without the CPU engine's expert prepacking; the engine itself prepacks and runs."""
    diffs = compare(*moe_pair, PROMPTS)
    assert {"mlps_input", "mlps_output"} <= set(diffs)
    assert all(within_tolerance(diff) for diff in diffs.values()), diffs


def test_prepacked_expert_weights_are_refused_not_returned(moe_pair):
    """vLLM's CPU MoE reorders its expert weights for its grouped GEMM (same shape, other values)."""
    hf_model, vllm_model = moe_pair
    assert hf_model.parameter("layers.0.mlp.experts.gate_up_proj").ndim == 3
    with pytest.raises(RuntimeError, match="prepacks MoE expert weights"):
        with torch.no_grad(), vllm_model.trace(PROMPTS[0]):
            vllm_model.parameter("layers.0.mlp.experts.routed_experts.w13_weight").save()


def test_sampled_architectures_equal_hf_on_every_accessor():
    """Exaone-4 (vLLM's layer overwrites the residual it is passed) and Cohere (no LM head module: the tied
    embedding unembeds), each checked by the sweep in its own process."""
    sample = ["exaone4", "cohere"]
    run = subprocess.run([sys.executable, "-m", "harness.equivalence", *sample], cwd=TESTS,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    results = json.loads(line.removeprefix(RESULT_PREFIX))
    for model_type in sample:
        result = results[model_type]
        assert result["status"] == "pass", (model_type, result["reason"])
        assert len(result["max_abs_diff"]) == 8
        assert result["generations"]["vllm"] == result["generations"]["hf"]


def test_moe_model_builds_after_a_dense_engine_in_the_same_process(tiny_path):
    """vLLM sets up its expert-parallel group with the process's first engine, and only for a MoE model; a MoE
    model loaded after a dense engine still builds (a fresh process, so no earlier MoE engine made the group)."""
    script = (
        "import sys\n"
        "from nnterp.standardized.vllm import StandardizedVLLM\n"
        "StandardizedVLLM(sys.argv[1], dtype='float32', max_model_len=128, max_num_seqs=2)\n"
        "moe = StandardizedVLLM(sys.argv[2], dispatch=False, dtype='float32', max_model_len=128, check_renaming=False)\n"
        "print('built', type(moe._module).__name__)\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tiny_path("gpt2")), str(tiny_path("mixtral"))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "built MixtralForCausalLM" in run.stdout
