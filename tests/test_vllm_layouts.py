"""The vLLM sweep's recorded results (layouts/vllm/_validated.json) are complete, and static layout inference
on the real vLLM classes (meta tree, no engine) of a fixed sample still matches the reviewed snapshots. The full
sweep is `python -m tests.harness.sweep --update --backend vllm`."""

import json

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.core.layout import LAYOUTS_DIR, drift, load_snapshot, signature_of  # noqa: E402
from nnterp.core.layout.infer import output_from_source, overwritten_before_read  # noqa: E402
from harness.architectures import RESULTS_FILE, SMOLLM2  # noqa: E402
from harness.known_limits import VLLM_LIMITS  # noqa: E402

RESULTS = json.loads((LAYOUTS_DIR / "vllm" / RESULTS_FILE).read_text())
PASSING = sorted(mt for mt, result in RESULTS.items() if result["status"] == "pass")

SAMPLE = [
    SMOLLM2,        # real checkpoint, Llama classes
    "gpt2",         # tuple outputs, no residual argument
    "gemma3_text",  # embeddings scaled outside the embedding module
    "mixtral",      # mixture of experts (the CPU engine's expert prepacking skipped in the meta tree)
    "exaone4",      # a layer that takes a residual argument and ignores it
    "cohere",       # no LM head module: unembeds with the tied input embedding
    "olmo2",        # vLLM's Transformers backend, keyed by the wrapped HF class
]


def test_vllm_target_reached_and_every_failure_explained():
    assert len(PASSING) >= 40 and SMOLLM2 in PASSING
    failing = {mt: r["reason"] for mt, r in RESULTS.items() if r["status"] != "pass"}
    assert all(reason.strip() for reason in failing.values()), failing
    assert not [mt for mt in VLLM_LIMITS if mt in PASSING], "known limits of passing architectures"


def test_every_passing_architecture_has_a_reviewed_layout():
    """Native classes have one snapshot each; vLLM's Transformers backend wraps many HF models in one class, so
    its snapshots are keyed by the wrapped HF class too."""
    missing = [mt for mt in PASSING if load_snapshot("vllm", RESULTS[mt]["architecture"]) is None]
    assert not missing
    wrapped = [RESULTS[mt]["architecture"] for mt in PASSING if RESULTS[mt].get("engine") == "transformers-backend"]
    assert all("/" in key for key in wrapped) and len(set(wrapped)) == len(wrapped)


@pytest.mark.parametrize("model_type", SAMPLE)
def test_vllm_layout_matches_reviewed_snapshot(model_type, tiny_path):
    from nnterp.standardized.vllm import StandardizedVLLM

    assert model_type in PASSING, f"{model_type} is in the CI sample but not recorded as passing"
    if model_type == SMOLLM2:
        from nnterp.testing.smollm2 import smollm2_path

        path = smollm2_path()
    else:
        path = tiny_path(model_type)
    # the layout is inferred at load, without starting the engine
    model = StandardizedVLLM(str(path), dispatch=False, dtype="float32", max_model_len=128, check_layout=False,
                             check_renaming=False)
    assert model.layout.architecture == RESULTS[model_type]["architecture"]
    reviewed = load_snapshot("vllm", model.layout.architecture)
    assert reviewed is not None, f"no reviewed vLLM layout for {model.layout.architecture}"
    assert drift(model.layout, reviewed) == []
    layer_layouts = [layout for key, layout in model.layout.modules.items() if key.startswith("layer:")]
    assert layer_layouts and all(layout.input.residual == "residual" or layout.output.kind != "dual" for layout in layer_layouts)


class IgnoresResidual(torch.nn.Module):
    """vLLM's post-norm Exaone-4 layer: takes the fused-norm residual like its siblings, overwrites it first, and
    returns ``(stream, intermediate)``: the stream is ``hidden_states`` alone."""

    def forward(self, positions, hidden_states, residual):
        residual = hidden_states
        hidden_states = hidden_states * 2
        hidden_states = residual + hidden_states
        return hidden_states, residual


class UsesResidual(torch.nn.Module):
    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
        else:
            residual = residual + hidden_states
        return hidden_states, residual


def test_residual_argument_a_layer_overwrites_is_not_part_of_its_stream():
    ignoring, using = signature_of(IgnoresResidual()), signature_of(UsesResidual())
    assert ignoring.residual is None and using.residual == "residual"
    assert output_from_source(IgnoresResidual(), ignoring).kind == "tuple"
    assert output_from_source(UsesResidual(), using).kind == "dual"
    from vllm.model_executor.models.exaone4 import Exaone4DecoderLayer
    from vllm.model_executor.models.llama import LlamaDecoderLayer

    assert overwritten_before_read(Exaone4DecoderLayer.forward, "residual")
    assert not overwritten_before_read(LlamaDecoderLayer.forward, "residual")


class IndexedStack(torch.nn.Module):
    """vLLM GPT-OSS style: each layer is bound to a name by indexing, then called positionally."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([UsesResidual()])

    def forward(self, positions, x):
        residual = None
        for i in range(len(self.layers)):
            layer = self.layers[i]
            x, residual = layer(positions, x, residual)
        return x + residual


def test_call_style_read_through_a_name_bound_by_indexing():
    from nnterp.core.layout import call_style_from_source

    assert call_style_from_source(IndexedStack(), "layers", "hidden_states", 1) == "positional"


class KeywordsFromDict(torch.nn.Module):
    """vLLM A.X-K1 style: the attention's arguments are collected in a dict literal and unpacked."""

    def __init__(self):
        super().__init__()
        self.self_attn = torch.nn.Linear(4, 4)

    def forward(self, positions, hidden_states):
        attn_kwargs = {"positions": positions, "hidden_states": hidden_states}
        return self.self_attn(**attn_kwargs)


def test_call_style_read_through_an_unpacked_dict_literal():
    from nnterp.core.layout import call_style_from_source

    assert call_style_from_source(KeywordsFromDict(), "self_attn", "hidden_states", 1) == "keyword"
    assert call_style_from_source(KeywordsFromDict(), "self_attn", "residual", 2) is None


class ScalesBoundEmbedding(torch.nn.Module):
    """vLLM MiniCPM style: the embedding's output is bound to a name, then multiplied by a config field."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"scale_emb": 12.0})()
        self.embed_tokens = torch.nn.Embedding(8, 4)

    def forward(self, input_ids):
        embeds = self.embed_tokens(input_ids)
        embeds = embeds * self.config.scale_emb
        return embeds


class InheritsTheScale(ScalesBoundEmbedding):
    """vLLM MiniCPM3 style: the forward that scales is the base class's."""


class ScalesInline(torch.nn.Module):
    """vLLM Gemma style: a buffer multiplies the embedding call inline."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(8, 4)
        self.register_buffer("normalizer", torch.tensor(2.0))

    def forward(self, input_ids):
        return self.normalizer * self.embed(input_ids)


def test_embedding_scale_read_off_the_holder_source():
    from nnterp.backends.vllm.embedding_scale import scale_path as _scale_path

    assert _scale_path(ScalesBoundEmbedding, "embed_tokens") == ("config", "scale_emb")
    assert _scale_path(InheritsTheScale, "embed_tokens") == ("config", "scale_emb")
    assert _scale_path(ScalesInline, "embed") == ("normalizer",)
    assert _scale_path(KeywordsFromDict, "self_attn") is None
