"""vLLM's logging at WARNING unless the user chose a level; its per-call progress bars only on request."""

import logging
import os
import types

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.backends.vllm import engine  # noqa: E402
from nnterp.standardized import vllm as standardized_vllm  # noqa: E402


@pytest.fixture
def vllm_logger():
    logger = logging.getLogger("vllm")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_vllm_logs_at_warning_by_default(monkeypatch, vllm_logger):
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    vllm_logger.setLevel(logging.INFO)  # as vLLM configures itself by default
    engine.quiet_vllm_logging()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "WARNING"  # inherited by the engine's worker processes
    assert vllm_logger.level == logging.WARNING


def test_a_user_set_vllm_logging_level_is_kept(monkeypatch, vllm_logger):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "debug")
    engine.quiet_vllm_logging()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "debug" and vllm_logger.level == logging.DEBUG


class _RecordingLLM:
    def __init__(self):
        self.calls = []
        self.llm_engine = types.SimpleNamespace(step=lambda: [])  # its steps get wrapped at load

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True):
        self.calls.append(use_tqdm)


@pytest.mark.parametrize("use_tqdm", [False, True])
def test_progress_bars_follow_use_tqdm(monkeypatch, use_tqdm):
    """nnsight calls llm.generate without use_tqdm (vLLM's default draws bars on every trace)."""
    llm = _RecordingLLM()
    monkeypatch.setattr(standardized_vllm._VLLM, "_load_sync", lambda self, repo_id, **kwargs: llm)
    model = object.__new__(standardized_vllm.StandardizedVLLM)
    object.__setattr__(model, "_use_tqdm", use_tqdm)
    loaded = standardized_vllm.StandardizedVLLM._load_sync(model, "some/model")
    loaded.generate(["a prompt"], sampling_params=[None], lora_request=[None])  # as nnsight's _call does
    loaded.generate(["a prompt"], use_tqdm=not use_tqdm)  # an explicit choice still wins
    assert llm.calls == [use_tqdm, not use_tqdm]
