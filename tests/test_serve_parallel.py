"""``nnterp serve`` on pipeline- and tensor-parallel CPU engines (two ranks, one core each): steering a layer of
each stage and capturing layers of both stages gives what forward hooks on the HF model of the same weights give,
over the prompt and the generated tokens."""

import pytest
import torch
from harness.server import running_server
from hf_reference import add_to_stream, outputs_with_hooks
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.client import Client  # noqa: E402

PROMPT = "The capital of France is"


def hooked_streams(path: str, token_ids: list[int], steer: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer and MLP outputs of one plain HF forward on ``token_ids``, ``steer[layer]`` added to layer outputs by hooks."""
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    layers = model.model.layers
    read = {**{f"layers_output.{index}": layer for index, layer in enumerate(layers)},
            **{f"mlps_output.{index}": layer.mlp for index, layer in enumerate(layers)}}
    return outputs_with_hooks(model, token_ids, {layers[index]: add_to_stream(vector) for index, vector in steer.items()}, read)


@pytest.mark.parametrize("parallel", [["--pipeline-parallel-size", "2"], ["--tensor-parallel-size", "2"]], ids=["pp2", "tp2"])
def test_served_steering_and_captures_equal_hf_hooks(tiny_path, tmp_path, parallel):
    path = str(tiny_path("llama"))
    vectors = {layer: torch.randn(128, generator=torch.Generator().manual_seed(layer)) * 4 for layer in (0, 2)}
    arguments = ["--dtype", "float32", "--max-model-len", "256", *parallel]
    with running_server(path, arguments, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, log=tmp_path / "server.log") as url:
        result = Client(url).complete(
            PROMPT, max_tokens=3, return_token_ids=True,
            steer=[{"layers": [layer], "vector": vector.tolist()} for layer, vector in vectors.items()],
            capture=[{"accessor": "layers_output", "layers": [0, 2], "tokens": "all"},
                     {"accessor": "mlps_output", "layers": [1], "tokens": "all"}])
    tokenizer = AutoTokenizer.from_pretrained(path)
    token_ids = tokenizer(PROMPT)["input_ids"] + result.response["choices"][0]["token_ids"][:-1]
    expected = hooked_streams(path, token_ids, vectors)
    unsteered = hooked_streams(path, token_ids, {})
    for accessor, layer in (("layers_output", 0), ("layers_output", 2), ("mlps_output", 1)):
        ours, reference = result.captures[accessor, layer], expected[f"{accessor}.{layer}"]
        assert ours.shape == reference.shape, (accessor, layer, ours.shape)
        assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max(), (accessor, layer)
        assert not torch.allclose(reference, unsteered[f"{accessor}.{layer}"]), "steering must change every capture"
