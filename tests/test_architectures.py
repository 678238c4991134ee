"""Every architecture recorded as passing in layouts/hf/_validated.json still passes and keeps its layout."""

import json

import pytest

from nnterp import StandardizedTransformer
from nnterp.layout import LAYOUTS_DIR, drift, load_snapshot
from nnterp.testing.architectures import RESULTS_FILE, SMOLLM2
from nnterp.validation import validate

RESULTS = json.loads((LAYOUTS_DIR / "hf" / RESULTS_FILE).read_text())
PASSING = sorted(mt for mt, r in RESULTS.items() if r["status"] == "pass" and mt != SMOLLM2)


def test_at_least_40_architectures_validated():
    assert len(PASSING) >= 40


@pytest.mark.parametrize("model_type", PASSING)
def test_architecture_passes_validation_and_matches_reviewed_layout(model_type, tiny_path):
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
