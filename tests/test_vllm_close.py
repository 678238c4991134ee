"""Closing a vLLM engine releases its memory; a later trace starts a new one with the same values."""

import gc
import os

import pytest
import torch

pytest.importorskip("vllm")

from nnterp import StandardizedTransformer  # noqa: E402
from nnterp.standardized.vllm import StandardizedVLLM  # noqa: E402

PROMPT = "The quick brown fox"


def resident_mib() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) // 1024


def test_close_releases_the_engine_and_a_later_trace_starts_it_again(tiny_path):
    path = str(tiny_path("llama"))
    hf = StandardizedTransformer(path)
    with torch.no_grad(), hf.trace(PROMPT):
        expected = hf.layers_output[1].save()
    gc.collect()
    before = resident_mib()
    with StandardizedVLLM(path, dtype="float32", max_model_len=128) as model:
        with model.trace(PROMPT):
            first = model.layers_output[1].save()
        running = resident_mib()
        model.close()
        gc.collect()
        closed = resident_mib()
        with model.trace(PROMPT):  # a new engine
            again = model.layers_output[1].save()
    assert model.vllm_entrypoint is None  # left by the with block
    # the engine holds a 1 GiB KV cache on CPU: closing gives it back
    assert running - closed > 700, (before, running, closed)
    for value in (first, again):
        assert torch.allclose(model.as_batch(value), expected, atol=1e-4)
