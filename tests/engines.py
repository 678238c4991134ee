"""A HuggingFace model and a vLLM engine on the same weights, for the tests that compare them."""

import contextlib

from nnterp import StandardizedTransformer


@contextlib.contextmanager
def hf_and_vllm(path):
    """``(StandardizedTransformer, StandardizedVLLM)`` on ``path`` (float32, small engine); the engine is shut
    down on leaving, as vLLM keeps its memory until then."""
    from nnterp.standardized.vllm import StandardizedVLLM

    with StandardizedVLLM(str(path), dtype="float32", max_model_len=128, max_num_seqs=4) as vllm_model:
        yield StandardizedTransformer(str(path)), vllm_model
