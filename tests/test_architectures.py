"""The HF architecture sweep: its recorded results (layouts/hf/_validated.json, docs/architectures.md) are
complete and current, and a fixed sample of it (one architecture per way a model is built) still passes with
its reviewed layout. The full sweep is `python -m tests.harness.sweep --update`."""

import json

import pytest

from nnterp import StandardizedTransformer
from nnterp.core.layout import LAYOUTS_DIR, drift, load_snapshot
from harness.architectures import RESULTS_FILE, SMOLLM2
from harness.known_limits import HF_LIMITS
from harness.report import PAGE, render_page
from nnterp.testing.tiny import causal_lm_architectures
from nnterp.validation import validate

RESULTS = json.loads((LAYOUTS_DIR / "hf" / RESULTS_FILE).read_text())
PASSING = sorted(mt for mt, r in RESULTS.items() if r["status"] == "pass" and mt != SMOLLM2)

SAMPLE = [
    "llama",             # pre-norm decoder, keyword-called attention
    "gpt2",              # Conv1D projections, tuple outputs
    "falcon",            # parallel attention and MLP, the layer adds into the MLP's output in place
    "mixtral",           # mixture of experts
    "deepseek_v3",       # multi-head latent attention
    "gemma3",            # multimodal wrapper exposing its text model, soft-capped logits
    "qwen3_next",        # hybrid linear-attention stack
    "bert",              # post-norm, no final norm: ln_final is the identity, the head keeps its transform
    "bart",              # decoder of an encoder-decoder family, embedding norm registered after the layers
    "recurrent_gemma",   # recurrent blocks, logits soft cap under another config key
]  # hybrid Mamba/attention stacks and state-space blocks: test_architecture_structures.py


def test_hf_target_reached_and_every_architecture_recorded():
    assert len(PASSING) >= 160
    assert set(causal_lm_architectures()) <= set(RESULTS)


def test_every_failure_has_a_specific_reason_and_no_known_limit_is_stale():
    failing = {mt: r["reason"] for mt, r in RESULTS.items() if r["status"] != "pass"}
    assert all(reason.strip() for reason in failing.values()), failing
    stale = [mt for mt in HF_LIMITS if RESULTS.get(mt, {}).get("status") == "pass"]
    assert not stale, f"known limits of passing architectures: {stale}"


def test_every_passing_architecture_has_a_reviewed_layout():
    missing = [mt for mt in PASSING if load_snapshot("hf", RESULTS[mt]["architecture"]) is None]
    assert not missing


def test_docs_page_is_generated_from_the_recorded_results():
    vllm = json.loads((LAYOUTS_DIR / "vllm" / RESULTS_FILE).read_text())
    assert PAGE.read_text() == render_page({"hf": RESULTS, "vllm": vllm}), "run `python -m tests.harness.sweep --update`"


@pytest.mark.parametrize("model_type", SAMPLE)
def test_sampled_architecture_passes_validation_and_matches_reviewed_layout(model_type, tiny_path):
    assert model_type in PASSING, f"{model_type} is in the CI sample but not recorded as passing"
    model = StandardizedTransformer(str(tiny_path(model_type)), check_layout=False)
    reviewed = load_snapshot("hf", model.layout.architecture)
    assert reviewed is not None, f"no reviewed layout for {model.layout.architecture}"
    assert drift(model.layout, reviewed) == []
    report = validate(model)
    assert report.passed, str(report)


def test_smollm2_passes_validation_and_predicts_paris(smollm2):
    report = validate(smollm2)
    assert report.passed, str(report)
    assert drift(smollm2.layout, load_snapshot("hf", "LlamaForCausalLM")) == []
    with smollm2.trace("The capital of France is"):
        probs = smollm2.next_token_probs.save()
    assert smollm2.tokenizer.decode(int(probs[0].argmax())) == " Paris"


def test_tiny_config_entries_that_disagree_are_refused():
    from nnterp.testing.tiny_configs import _table

    assert _table(("a", {"x": 1}), (("a", "b"), {"y": 2})) == {"a": {"x": 1, "y": 2}, "b": {"y": 2}}
    with pytest.raises(ValueError, match=r"a: tiny-config entries disagree on \['x'\]"):
        _table(("a", {"x": 1}), ("a", {"x": 2}))
