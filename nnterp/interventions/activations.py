"""Module and activation getters that work on any nnsight language model (re-exported as nnterp 1.x's
``nnterp.nnsight_utils``).

On a standardized model (``StandardizedTransformer``, ``StandardizedVLLM``) they go through the standard
accessors, so ``get_layer_output`` is the residual stream whatever the layer returns natively; on a plain
nnsight ``LanguageModel`` the standard modules are located the same way nnterp locates them (alias tables,
then the model's structure), so GPT-2 works as well as Llama.

Token positions (``idx``) are each prompt's own: ``-1`` is every prompt's last real token with left or right
padding, ``0`` its first real token.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
import torch.nn as nn
from nnsight.modeling.transformers import TransformersModel

from ..core.progress import with_progress
from ..core.rename import ModuleNames, RenameConfig, resolve_names
from ..core.tracing import Positions, token_positions, tokens_at, trace_prompts

# Inside an nnsight trace activations are real tensors; kept as a name for annotations.
TraceTensor = torch.Tensor

GetModuleOutput = Callable[[TransformersModel, int], TraceTensor]

_PLAIN_NAMES: "weakref.WeakKeyDictionary[nn.Module, ModuleNames]" = weakref.WeakKeyDictionary()


def is_standardized(nn_model: Any) -> bool:
    from ..standardized.base import StandardizedMixin

    return isinstance(nn_model, StandardizedMixin)


def module_names(nn_model: Any) -> ModuleNames:
    """Where the standard modules live in ``nn_model`` (located once per plain model)."""
    if is_standardized(nn_model):
        return nn_model.names
    module = nn_model._module
    if module not in _PLAIN_NAMES:
        _PLAIN_NAMES[module] = resolve_names(module)
    return _PLAIN_NAMES[module]


def _envoy(nn_model: Any, standard: str):
    if is_standardized(nn_model):
        return getattr(nn_model, standard)
    return nn_model.get(getattr(module_names(nn_model), standard))


def _layer_child(nn_model: Any, layer: int, standard: str):
    if is_standardized(nn_model):
        return nn_model._role_envoy(standard, nn_model._check_layer_index(layer, f"get_{standard}"), f"get_{standard}")
    native = getattr(module_names(nn_model), standard)
    envoy = get_layer(nn_model, layer)
    if native is None or not hasattr(envoy._module, native):
        raise AttributeError(f"layer {layer} ({type(envoy._module).__name__}) has no {standard} module nnterp can find.")
    return getattr(envoy, native)


def get_embed_tokens(model: TransformersModel):
    """The token embedding module (envoy)."""
    return _envoy(model, "embed_tokens")


def get_layers(model: TransformersModel):
    """The list of decoder layers (envoys)."""
    return _envoy(model, "layers")


def get_num_layers(nn_model: TransformersModel) -> int:
    """The number of decoder layers."""
    if is_standardized(nn_model):
        return nn_model.num_layers
    return len(get_layers(nn_model))


def layer_index(nn_model: Any, layer: int, where: str = "layer") -> int:
    """``layer`` (negative counts from the end) as an index in ``0..num_layers-1``; out of range raises."""
    if is_standardized(nn_model):
        return nn_model._check_layer_index(layer, where)
    count = get_num_layers(nn_model)
    if not isinstance(layer, int) or not -count <= layer < count:
        raise IndexError(f"{where} {layer!r} is out of range: the model has {count} layers.")
    return layer % count


def get_layer(nn_model: TransformersModel, layer: int):
    """Decoder layer ``layer`` (envoy)."""
    return get_layers(nn_model)[layer_index(nn_model, layer)]


def get_layer_input(nn_model: TransformersModel, layer: int) -> TraceTensor:
    """The residual stream entering ``layer`` (inside a trace)."""
    if is_standardized(nn_model):
        return nn_model.layers_input[layer]
    return get_layer(nn_model, layer).input


def get_layer_output(nn_model: TransformersModel, layer: int) -> TraceTensor:
    """The residual stream leaving ``layer`` (inside a trace), never the layer's raw tuple."""
    if is_standardized(nn_model):
        return nn_model.layers_output[layer]
    return unpack_tuple(get_layer(nn_model, layer).output)


def get_attention(nn_model: TransformersModel, layer: int):
    """The attention module of ``layer`` (envoy)."""
    return _layer_child(nn_model, layer, "self_attn")


def get_attention_output(nn_model: TransformersModel, layer: int) -> TraceTensor:
    """The attention block's output in ``layer`` (inside a trace)."""
    if is_standardized(nn_model):
        return nn_model.attentions_output[layer]
    return unpack_tuple(get_attention(nn_model, layer).output)


def get_mlp(nn_model: TransformersModel, layer: int):
    """The MLP module of ``layer`` (envoy)."""
    return _layer_child(nn_model, layer, "mlp")


def get_mlp_output(nn_model: TransformersModel, layer: int) -> TraceTensor:
    """The MLP block's output in ``layer`` (inside a trace)."""
    if is_standardized(nn_model):
        return nn_model.mlps_output[layer]
    return unpack_tuple(get_mlp(nn_model, layer).output)


def get_logits(nn_model: TransformersModel) -> TraceTensor:
    """The model's logits (inside a trace): ``[batch, seq, vocab]``; on vLLM one row per request."""
    if is_standardized(nn_model):
        return nn_model.logits
    return nn_model.output.logits


def get_unembed_norm(nn_model: TransformersModel):
    """The final norm applied before the LM head (envoy)."""
    return _envoy(nn_model, "ln_final")


def get_unembed(nn_model: TransformersModel):
    """The LM head (envoy)."""
    return _envoy(nn_model, "lm_head")


def project_on_vocab(nn_model: TransformersModel, h: TraceTensor) -> TraceTensor:
    """Logits of hidden states ``h``: the final norm, then the LM head (and, on standardized models, the
    logit scaling / soft-capping the architecture applies)."""
    if is_standardized(nn_model):
        return nn_model.project_on_vocab(h)
    return get_unembed(nn_model)._module(get_unembed_norm(nn_model)._module(h))


def project_negated_on_vocab(nn_model: Any, h: TraceTensor) -> TraceTensor:
    """Logits of the negated normalised hidden states: the LM head applied to ``-ln_final(h)``."""
    if not is_standardized(nn_model):
        return get_unembed(nn_model)._module(-get_unembed_norm(nn_model)._module(h))
    from ..core.backend import HEAD

    def project(stream: torch.Tensor) -> torch.Tensor:
        return nn_model.postprocess_logits(nn_model._lm_head_logits(-nn_model._final_normed(stream)))

    return nn_model._backend.compute_at("project_negated_on_vocab", HEAD, project, h)


def get_next_token_probs(nn_model: TransformersModel) -> TraceTensor:
    """Softmax of the logits at each prompt's last token, ``[batch, vocab]`` (inside a trace)."""
    if is_standardized(nn_model):
        return nn_model.next_token_probs
    logits = get_logits(nn_model)
    if logits.shape[0] > 1 and getattr(nn_model.tokenizer, "padding_side", "left") != "left":
        raise ValueError(
            "get_next_token_probs on a plain LanguageModel reads position -1, a pad token for the shorter "
            "prompts of a right-padded batch. Use left padding, compute_next_token_probs(model, prompts), or "
            "a StandardizedTransformer (its next_token_probs reads each prompt's last real token)."
        )
    return logits[:, -1].softmax(-1)


def set_layer_output(nn_model: TransformersModel, layer: int, tensor: TraceTensor) -> None:
    """Replace the residual stream leaving ``layer`` (inside a trace)."""
    if is_standardized(nn_model):
        nn_model.layers_output[layer] = tensor
        return
    envoy = get_layer(nn_model, layer)
    output = envoy.output
    envoy.output = (tensor, *output[1:]) if isinstance(output, tuple) else tensor


def unpack_tuple(tensor_or_tuple: Any) -> Any:
    """The first element of a tuple (a module's hidden state), anything else as it is."""
    return tensor_or_tuple[0] if isinstance(tensor_or_tuple, tuple) else tensor_or_tuple


def last_token_probs(nn_model: Any, last: Positions) -> torch.Tensor:
    """Next-token probabilities ``[batch, vocab]`` (float32) at each prompt's last token; ``last`` is
    :func:`token_positions` ``(nn_model, -1)``."""
    logits = get_logits(nn_model)
    if logits.ndim == 2:  # the engine serves one row per request, already at its last token
        return logits.float().softmax(-1)
    return tokens_at(nn_model, logits, last).float().softmax(-1)


class ModuleAccessor:
    """The torch modules of a HuggingFace model under nnterp's standard names, without nnsight::

        ModuleAccessor
        ├── embed_tokens
        ├── layers
        │   ├── self_attn
        │   └── mlp
        ├── ln_final
        └── lm_head

    ``rename_config`` says where modules live when nnterp cannot find them; ``rename`` maps more native
    paths to names of your own (``{"model.rotary_emb": "rope"}`` makes ``accessor.rope`` that module).
    ``nn_model`` is the model wrapped by nnsight under the same names (nnterp 1.x built one eagerly; here it is
    built on first use).
    """

    def __init__(self, model: nn.Module, rename_config: RenameConfig | None = None, rename: dict[str, str] | None = None):
        self.model = model
        self.names = resolve_names(model, rename_config)
        self.aliases = {alias: native for native, alias in (rename or {}).items()}
        self._nn_model = None

    @property
    def nn_model(self):
        """``nnsight.NNsight`` over the model, with the standard names (and ``rename``'s) mounted."""
        if self._nn_model is None:
            from nnsight import NNsight

            rename = self.names.nnsight_rename()
            for alias, native in self.aliases.items():
                rename.setdefault(native, []).append(alias)
            self._nn_model = NNsight(self.model, rename=rename)
        return self._nn_model

    def __getattr__(self, name: str) -> nn.Module:
        if name in ("model", "names", "aliases", "_nn_model"):
            raise AttributeError(name)
        native = self.aliases.get(name) or (getattr(self.names, name) if name in ("embed_tokens", "layers", "ln_final", "lm_head") else None)
        if native is not None:
            return self.model.get_submodule(native)
        attribute = getattr(self.model, name, None)
        if isinstance(attribute, nn.Module):
            return attribute
        raise AttributeError(f"Attribute {name} is not a module of {type(self.model).__name__} nnterp knows.")

    def get_embed_tokens(self) -> nn.Module:
        return self.embed_tokens

    def get_layers(self) -> nn.ModuleList:
        return self.layers

    def get_mlp(self, layer: int) -> nn.Module:
        return self._layer_child(layer, "mlp")

    def get_attention(self, layer: int) -> nn.Module:
        return self._layer_child(layer, "self_attn")

    def get_unembed_norm(self) -> nn.Module:
        return self.ln_final

    def get_unembed(self) -> nn.Module:
        return self.lm_head

    def _layer_child(self, layer: int, standard: str) -> nn.Module:
        native = getattr(self.names, standard)
        if native is None:
            raise AttributeError(f"the layers of {type(self.model).__name__} have no {standard} module nnterp can find.")
        return getattr(self.layers[layer], native)


def read_token_activations(nn_model: Any, layers: list[int], get_activations: GetModuleOutput, positions: list) -> torch.Tensor:
    """Inside a trace: ``get_activations(nn_model, layer)`` at each of ``positions`` (entries of
    :func:`~nnterp.tracing.token_positions`) for each of ``layers``: ``[layers, batch, positions, hidden]``.
    Each layer is read once, in forward order (a trace can only read a layer before the next one runs)."""
    indices = [layer_index(nn_model, layer, "layers") for layer in layers]
    read = {}
    for index in sorted(set(indices)):
        activation = get_activations(nn_model, index)
        read[index] = torch.stack([tokens_at(nn_model, activation, position) for position in positions], dim=1)
    return torch.stack([read[index] for index in indices])


@torch.no_grad()
def get_token_activations(
    nn_model: TransformersModel,
    prompts=None,
    layers=None,
    get_activations: GetModuleOutput | None = None,
    remote=False,
    idx: int | None = None,
    tracer=None,
):
    """The activations of token ``idx`` (default: each prompt's last token) of each prompt at each layer,
    ``[num_layers, num_prompts, hidden]``, on CPU.

    ``get_activations(model, layer)`` defaults to the layer output (residual stream). ``idx`` counts each
    prompt's own real tokens (negative from its end), whatever the padding side. Pass ``tracer`` to read
    inside a trace you opened (on a plain nnsight model, before reading any module there); the result then
    stays on the model's device, unsaved.
    """
    if tracer is None and prompts is None:
        raise ValueError("prompts must be provided if tracer is None")
    get_activations = get_activations or get_layer_output
    layers = list(range(get_num_layers(nn_model))) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    idx = -1 if idx is None else idx
    if tracer is not None:
        return read_token_activations(nn_model, layers, get_activations, [token_positions(nn_model, idx)])[:, :, 0]

    def compute(model, rows):
        positions = [token_positions(model, idx)]
        return read_token_activations(model, layers, get_activations, positions)[:, :, 0].transpose(0, 1).cpu()

    return trace_prompts(nn_model, prompts, compute, remote).transpose(0, 1)


@torch.no_grad()
def collect_last_token_activations_session(
    nn_model,
    prompts,
    batch_size,
    layers=None,
    get_activations=None,
    remote=False,
    idx=None,
):
    """:func:`collect_token_activations_batched`, kept under nnterp 1.x's name (a session only changes how
    remote jobs are grouped). ``[num_layers, num_prompts, hidden]`` on CPU."""
    return collect_token_activations_batched(nn_model, prompts, batch_size, layers, get_activations, remote, idx, use_session=False)


def collect_token_activations_batched(
    nn_model: TransformersModel,
    prompts,
    batch_size,
    layers=None,
    get_activations: GetModuleOutput | None = None,
    remote=False,
    idx=None,
    tqdm=None,
    use_session=True,
):
    """:func:`get_token_activations` over ``prompts`` in batches of ``batch_size`` (one trace each),
    ``[num_layers, num_prompts, hidden]`` on CPU. ``tqdm`` (e.g. ``tqdm.auto.tqdm``) shows progress."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    starts = with_progress(tqdm, range(0, len(prompts), batch_size), "Collecting activations")
    batches = [
        get_token_activations(nn_model, list(prompts[start:start + batch_size]), layers, get_activations, remote, idx)
        for start in starts
    ]
    return torch.cat(batches, dim=1)


@torch.no_grad()
def compute_next_token_probs(
    nn_model: TransformersModel, prompt: str | list[str], remote=False, *, intervention: Callable[[Any], None] | None = None
) -> torch.Tensor:
    """Next-token probabilities at each prompt's last token, ``[num_prompts, vocab]`` on CPU.
    ``intervention(model)`` runs inside the trace before they are read (e.g. ``lambda m: m.steer(...)``)."""

    def compute(model, rows):
        last = token_positions(model, -1)
        if intervention is not None:
            intervention(model)
        return last_token_probs(model, last).cpu()

    return trace_prompts(nn_model, prompt, compute, remote)


__all__ = [
    "GetModuleOutput",
    "ModuleAccessor",
    "TraceTensor",
    "collect_last_token_activations_session",
    "collect_token_activations_batched",
    "compute_next_token_probs",
    "get_attention",
    "get_attention_output",
    "get_embed_tokens",
    "get_layer",
    "get_layer_input",
    "get_layer_output",
    "get_layers",
    "get_logits",
    "get_mlp",
    "get_mlp_output",
    "get_next_token_probs",
    "get_num_layers",
    "get_token_activations",
    "get_unembed",
    "get_unembed_norm",
    "project_on_vocab",
    "set_layer_output",
]
