"""Bad input gets an error that says what is wrong and what to do, from nnterp, not a library underneath; the
command line answers in one line."""

import os
import subprocess
import sys
import time

import pytest
import torch

from nnterp.core.forward_order import OutsideTraceError


@pytest.mark.parametrize("prompt, error, message", [
    ("", ValueError, r"prompt 0 \(''\) has no tokens"),
    (123, TypeError, r"takes a prompt \(str\).*got int 123"),
    ([], ValueError, r"model.trace\(\[\]\): no prompts given"),
    (["fine", 7.5], TypeError, "prompt 1 is float 7.5"),
    (torch.ones(2, 3), ValueError, "a tensor prompt is token ids"),
])
def test_bad_prompts_are_named(llama, prompt, error, message):
    with pytest.raises(error, match=message):
        with torch.no_grad(), llama.trace(prompt):
            llama.layers_output[0].save()
    with torch.no_grad(), llama.trace("still serving"):  # the model is unaffected
        assert llama.layers_output[0].save() is not None


def test_a_read_outside_a_trace_says_where_to_read(llama):
    with pytest.raises(OutsideTraceError, match=r"model.layers_output\[1\] .* inside a trace.*with model.trace"):
        llama.layers_output[1]
    with pytest.raises(OutsideTraceError, match="model.logits"):
        llama.logits


def run_cli(*args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "nnterp", *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **(env or {})})
    return run, time.monotonic() - start


def test_cli_errors_are_one_line_and_a_non_zero_exit(tmp_path):
    run, _ = run_cli("validate", str(tmp_path / "no-model-here"))
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert errors == [f"error: FileNotFoundError: StandardizedTransformer: the model path {tmp_path / 'no-model-here'} does not exist."]


def test_an_unknown_hub_name_without_network_fails_at_once():
    """Not in the cache and the hub unreachable (a closed local port stands for it): one line, no retries."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    run, seconds = run_cli("validate", "someone/not-a-model", env=env)
    assert run.returncode == 2, run.stderr
    assert "'someone/not-a-model' is not a local directory and not in the HuggingFace cache, and 127.0.0.1 cannot be reached" in run.stderr
    assert seconds < 45, f"{seconds:.0f} s: transformers' retries took over"
