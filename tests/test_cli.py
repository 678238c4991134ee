"""``python -m nnterp validate`` / ``run_tests``: tables, layout origin, exit status."""

import dataclasses
import re

import pytest

from nnterp.__main__ import layout_origin, main
from nnterp.validation import Check


def test_validate_prints_every_check_and_the_reviewed_layout(tiny_path, capsys):
    assert main(["validate", str(tiny_path("llama"))]) == 0
    output = capsys.readouterr().out
    assert "layout: reviewed snapshot" in output and "LlamaForCausalLM.json (inference agrees)" in output
    rows = re.findall(r"^(\S.*?)\s{2,}(pass|fail|n/a)\b", output, re.M)
    assert ("layers_input[i] == HF hidden_states[i]", "pass") in rows
    assert ("project_on_vocab(layers_output[-1]) == logits", "pass") in rows
    assert re.search(rf"^PASS: {len(rows)} passed, 0 failed$", output, re.M)


def test_validate_exits_1_when_a_check_fails(tiny_path, capsys, monkeypatch):
    import nnterp.validation

    real = nnterp.validation.validate

    def with_a_failure(model):
        report = real(model)
        report.checks.append(Check("an injected failing check", "fail", "max diff 1.00e+00"))
        return report

    monkeypatch.setattr(nnterp.validation, "validate", with_a_failure)
    assert main(["validate", str(tiny_path("llama"))]) == 1
    output = capsys.readouterr().out
    assert re.search(r"^an injected failing check\s+fail\s+max diff 1.00e\+00$", output, re.M)
    assert re.search(r"^FAIL: \d+ passed, 1 failed$", output, re.M)


def test_layout_origin_says_inferred_or_drifted(llama):
    unknown = dataclasses.replace(llama.layout, architecture="NoSuchForCausalLM")
    assert layout_origin(unknown).startswith("inferred from the model (no reviewed snapshot for NoSuchForCausalLM")
    drifted = dataclasses.replace(llama.layout, residual_additive=not llama.layout.residual_additive)
    assert "DIFFERS from the reviewed snapshot" in layout_origin(drifted) and "residual_additive" in layout_origin(drifted)


def test_run_tests_on_a_class_and_a_model(tiny_path, capsys):
    assert main(["run_tests", "-c", "GPT2LMHeadModel", "-m", str(tiny_path("llama"))]) == 0
    output = capsys.readouterr().out
    assert re.search(r"^tiny gpt2 \(GPT2LMHeadModel\)\s+pass", output, re.M)
    assert re.search(rf"^{re.escape(str(tiny_path('llama')))}\s+pass", output, re.M)
    assert re.search(r"^PASS: 2 passed, 0 failed$", output, re.M)


def test_run_tests_reports_a_model_that_does_not_load(tmp_path, capsys):
    assert main(["run_tests", "-m", str(tmp_path / "missing")]) == 1
    assert re.search(r"missing\s+fail\s+\w+Error", capsys.readouterr().out)


def test_run_tests_refuses_unknown_class_names():
    with pytest.raises(SystemExit, match="NotAModelForCausalLM"):
        main(["run_tests", "-c", "NotAModelForCausalLM"])


def test_validate_on_vllm_tables_the_comparison_with_hf(monkeypatch, capsys):
    """The vLLM comparison itself (check_vllm_against_hf) runs end to end in test_vllm.py; here, its table."""
    import nnterp.validation as validation
    from nnterp.core.layout import load_snapshot

    result = {
        "status": "fail", "architecture": "LlamaForCausalLM", "engine": "native",
        "layout": load_snapshot("vllm", "LlamaForCausalLM").to_json(),
        "max_abs_diff": {"layers_output": 2e-6, "mlps_output": 0.5},
        "max_rel_diff": {"layers_output": 1e-6, "mlps_output": 0.2},
        "generations": {"hf": {"plain": [1, 2]}, "vllm": {"plain": [1, 2]}},
    }
    monkeypatch.setattr(validation, "check_vllm_against_hf", lambda path: result)
    assert main(["validate", "some/model", "--backend", "vllm"]) == 1
    output = capsys.readouterr().out
    assert "LlamaForCausalLM (vllm, native vLLM model)" in output
    assert "layout: reviewed snapshot" in output and "LlamaForCausalLM.json (inference agrees)" in output
    assert re.search(r"^layers_output == HF\s+pass\s+max diff 2.00e-06 \(relative 1.00e-06\)$", output, re.M)
    assert re.search(r"^mlps_output == HF\s+fail\s+max diff 5.00e-01", output, re.M)
    assert re.search(r"^greedy generations \(plain, steered\) == HF\s+pass", output, re.M)
    assert re.search(r"^FAIL: 2 passed, 1 failed$", output, re.M)

    monkeypatch.setattr(validation, "check_vllm_against_hf", lambda path: {"status": "fail", "reason": "OSError: no model"})
    assert main(["validate", "some/model", "--backend", "vllm"]) == 1
    assert "FAIL: OSError: no model" in capsys.readouterr().out
