"""The standardized surface shared by every backend."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Sequence

import torch

from ..accessors import LayerAccessor, ModuleListView
from ..layout import ModelLayout, drift, load_snapshot
from ..distributed.pp import EMBEDDINGS, HEAD
from ..rename import SEQUENCE, ModuleNames, envoy_path, layer_child

logger = logging.getLogger("nnterp")

HIDDEN_SIZE_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
# Config keys of a factor the logits (or the bias-free LM head's input) are divided by: Granite's
# `logits_scaling`, Inkling's muP width multiplier.
LOGIT_DIVISORS = ("logits_scaling", "logits_mup_width_multiplier")
# Config keys of the soft cap applied to the logits: Gemma 2/3, RecurrentGemma, xLSTM.
LOGIT_SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


class LayoutDriftWarning(UserWarning):
    """The inferred layout differs from the reviewed snapshot under ``layouts/``."""


class Backend:
    """Engine-specific policy hooks; the HuggingFace backend is the identity. Positions in the forward
    pass are a layer index, ``EMBEDDINGS`` or ``HEAD`` (see ``nnterp.distributed.pp``)."""

    name = "hf"
    batches_prompts = True  # a trace takes a list of prompts

    def after_read(self, value: torch.Tensor, fresh: bool, where: str) -> torch.Tensor:
        return value

    def before_write(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def local_parameter(self, module: torch.nn.Module, param_name: str) -> torch.Tensor:
        """The full logical parameter of a module this process holds (HF holds it whole)."""
        return getattr(module, param_name).detach()

    def full_parameter(self, module: torch.nn.Module, param_name: str, path: str, position: Any) -> torch.Tensor:
        """The full logical parameter at ``path`` (``module`` runs at ``position`` of the forward pass)."""
        return self.local_parameter(module, param_name)

    def owns(self, position: Any) -> bool:
        """Whether this process runs the forward pass at ``position`` (always, except on a pipeline stage)."""
        return True

    def remote_read(self, where: str, position: Any) -> Any:
        raise NotImplementedError(f"{where}: this backend runs every module itself.")

    def run_value(self, where: str, read: Callable[[], Any]) -> Any:
        """A value the engine serves outside any module (logits, sampled tokens)."""
        return read()

    def run_write(self, write: Callable[[Any], None], value: Any) -> None:
        write(value)

    def compute_at(self, where: str, position: Any, compute: Callable[..., torch.Tensor], *inputs: Any) -> torch.Tensor:
        """``compute(*inputs)`` with the modules at ``position`` (run here: this process holds every module)."""
        return compute(*inputs)


class StandardizedMixin:
    """Accessors and helpers over ``self.names`` / ``self.layout`` / ``self._backend``.

    Subclasses set those three, then call ``_init_standard_surface()``.
    """

    names: ModuleNames
    layout: ModelLayout
    _backend: Backend

    def _init_standard_surface(self) -> None:
        self._mount_root_names()
        self.layers_input = LayerAccessor(self, "layer", "input")
        self.layers_output = LayerAccessor(self, "layer", "output")
        self.attentions_input = LayerAccessor(self, "self_attn", "input")
        self.attentions_output = LayerAccessor(self, "self_attn", "output")
        self.mlps_input = LayerAccessor(self, "mlp", "input")
        self.mlps_output = LayerAccessor(self, "mlp", "output")
        self.attentions = ModuleListView(self, "self_attn", "attentions")
        self.mlps = ModuleListView(self, "mlp", "mlps")
        if self.names.ln_final is None:
            from .identity import IdentityFinalNorm

            object.__setattr__(self, "ln_final", IdentityFinalNorm(self))

    def _mount_root_names(self) -> None:
        """Bind each standard root name (``embed_tokens``, ``layers``, ``ln_final``, ``lm_head``) the envoy tree
        does not have yet (no ``rename`` on vLLM; paths ``nnsight_rename`` leaves out) to its native envoy."""
        for standard in ("embed_tokens", "layers", "ln_final", "lm_head"):
            native = self.names.module_path(standard)
            if native is not None and native != standard and standard not in self.__dict__:
                object.__setattr__(self, standard, self.get(envoy_path(native)))

    # -- sizes -------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self._torch_module("layers"))

    @property
    def hidden_size(self) -> int:
        return _config_value(self._text_config, HIDDEN_SIZE_KEYS)

    @property
    def num_heads(self) -> int:
        return _config_value(self._text_config, ("num_attention_heads", "n_head", "num_heads", "n_heads"))

    @property
    def vocab_size(self) -> int:
        return _config_value(self._text_config, ("vocab_size", "padded_vocab_size"))

    # -- module lookup -------------------------------------------------------

    def _torch_module(self, standard: str) -> torch.nn.Module:
        native = getattr(self.names, standard)
        if native is None and standard == "ln_final":
            return torch.nn.Identity()  # the model has no final norm
        parts = [self._module.get_submodule(path) for path in native.split(SEQUENCE)]
        return parts[0] if len(parts) == 1 else torch.nn.Sequential(*parts)

    def _check_layer_index(self, index: int, accessor: str) -> int:
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"{accessor}[...] takes one integer layer index, got {index!r}.")
        n = self.num_layers
        if not -n <= index < n:
            raise IndexError(f"{accessor}[{index}] is out of range: the model has {n} layers (valid: 0..{n - 1} or -{n}..-1).")
        return index % n

    def _role_envoy(self, role: str, index: int, accessor: str):
        layer = self.layers[index]
        if role == "layer":
            return layer
        child = layer_child(layer._module, role, self.names)
        if child is None:
            children = [name for name, _ in layer._module.named_children()]
            raise AttributeError(
                f"{accessor}[{index}]: layer {index} ({type(layer._module).__name__}) has no {role} module "
                f"(its children are {children}). Pass RenameConfig({role}='<child name>') if one of them is it."
            )
        return getattr(layer, child)

    def parameter(self, path: str) -> torch.Tensor:
        """The full logical parameter at a standard path (``"lm_head.weight"``, ``"embed_tokens.weight"``,
        ``"layers.3.mlp.down_proj.weight"``) or a native one. Under vLLM tensor parallelism the shards are
        gathered (call it inside a trace, where every rank runs it); vocabulary padding is stripped."""
        module_path, _, param_name = path.rpartition(".")
        native = self._native_path(module_path)
        module = self._module.get_submodule(native)
        return self._backend.full_parameter(module, param_name, path, self._position_of(native))

    def _position_of(self, native: str) -> Any:
        """Where the module at a native path runs in the forward pass: a layer index, or before / after the
        layers."""
        if native == self.names.embed_tokens or native.startswith(self.names.embed_tokens + "."):
            return EMBEDDINGS
        prefix = self.names.layers + "."
        if native.startswith(prefix):
            return int(native[len(prefix):].split(".")[0])
        return HEAD

    def _native_path(self, path: str) -> str:
        """Translate the standard names in a dotted module path to the model's own."""
        parts = path.split(".") if path else []
        if parts and parts[0] in ("embed_tokens", "ln_final", "lm_head"):
            native = self.names.module_path(parts[0])
            if native is None:
                raise AttributeError(f"{path}: the model has no final norm (ln_final is the identity), so it has no parameters.")
            return ".".join([native, *parts[1:]])
        if parts and parts[0] == "layers":
            if len(parts) > 2 and parts[2] in ("self_attn", "mlp") and parts[1].isdigit():
                layer = self._module.get_submodule(self.names.layers)[int(parts[1])]
                parts[2] = layer_child(layer, parts[2], self.names) or parts[2]
            return ".".join([self.names.layers, *parts[1:]])
        return path

    # -- layout ---------------------------------------------------------------

    def _check_against_snapshot(self, check_layout: bool) -> None:
        reviewed = load_snapshot(self.layout.backend, self.layout.architecture)
        if reviewed is None:
            logger.info("nnterp: no reviewed layout for %s/%s; using the inferred one.", self.layout.backend, self.layout.architecture)
            return
        differences = drift(self.layout, reviewed)
        if differences and check_layout:
            import warnings

            warnings.warn(
                f"Inferred layout of {self.layout.architecture} ({self.layout.backend}) differs from the reviewed "
                f"snapshot: {differences}. The inferred layout is used.",
                LayoutDriftWarning,
                stacklevel=3,
            )

    # -- standard views --------------------------------------------------------

    @property
    def token_embeddings(self) -> torch.Tensor:
        """The output of ``embed_tokens`` (read inside a trace)."""
        if not self._backend.owns(EMBEDDINGS):
            return self._backend.remote_read("model.token_embeddings", EMBEDDINGS)
        scale = self._embedding_scale
        if scale is None:
            return self._backend.after_read(self.embed_tokens.output, fresh=False, where="model.token_embeddings")
        return self._backend.after_read(self.embed_tokens.output * scale, fresh=True, where="model.token_embeddings")

    @token_embeddings.setter
    def token_embeddings(self, value: torch.Tensor) -> None:
        from ..layout import check_same_shape

        if not self._backend.owns(EMBEDDINGS):
            return  # the stage that runs the embeddings applies the write
        check_same_shape(self.embed_tokens.output, value, "token_embeddings")
        scale = self._embedding_scale
        self.embed_tokens.output = self._backend.before_write(value if scale is None else value / scale)

    @property
    def _embedding_scale(self) -> torch.Tensor | None:
        """A factor the engine applies to ``embed_tokens``' output outside the module (None: none)."""
        return None

    @property
    def next_token_probs(self) -> torch.Tensor:
        """Softmax over the vocabulary at each prompt's last position, shape ``[batch, vocab]``."""
        return self.last_position(self.logits).float().softmax(-1)

    def last_position(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last position of each prompt of a ``[batch, seq, ...]`` activation."""
        return tensor[:, -1]

    def as_batch(self, activation: torch.Tensor) -> torch.Tensor:
        """An activation as ``[batch, seq, hidden]`` (the HF layout already is)."""
        return activation

    def skip_layers(self, start: int, end: int | None = None) -> None:
        """Skip layers ``start..end`` (inclusive): each outputs the residual stream entering ``start``."""
        end = start if end is None else end
        first = self._check_layer_index(start, "skip_layers")
        last = self._check_layer_index(end, "skip_layers")
        if last < first:
            raise ValueError(f"skip_layers: end ({end}) comes before start ({start}).")
        if not any(self._backend.owns(index) for index in range(first, last + 1)):
            return  # all of them run on other pipeline stages
        stream = self.layers_input[first]
        for index in range(first, last + 1):
            if not self._backend.owns(index):
                continue  # another pipeline stage skips its own layers
            envoy = self.layers[index]
            layout = self.layout.for_module("layer", envoy._module)
            envoy.skip(layout.output.build(stream))

    def skip_layer(self, index: int) -> None:
        self.skip_layers(index, index)

    def steer(
        self,
        layers: int | Sequence[int],
        steering_vector: torch.Tensor,
        factor: float = 1.0,
        positions: int | Sequence[int] | slice | None = None,
    ) -> None:
        """Add ``factor * steering_vector`` to the output of each layer in ``layers`` (inside a trace)."""
        for layer in [layers] if isinstance(layers, int) else layers:
            if not self._backend.owns(self._check_layer_index(layer, "steer")):
                continue  # the pipeline stage that runs this layer steers it
            stream = self.layers_output[layer]
            self.layers_output[layer] = add_at_positions(stream, factor * steering_vector, positions, self.hidden_size)

    def project_on_vocab(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of a residual-stream tensor: final norm, LM head, and the model's logit post-processing."""
        def project(stream: torch.Tensor) -> torch.Tensor:
            normed = self._torch_module("ln_final")(stream)
            return self.postprocess_logits(self._lm_head_logits(normed))

        return self._backend.compute_at("model.project_on_vocab", HEAD, project, hidden)

    def _lm_head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self._torch_module("lm_head")(normed)

    def postprocess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Scaling and soft-capping some architectures apply after the LM head."""
        config = self._text_config
        scale = getattr(config, "logit_scale", None)
        if isinstance(scale, (int, float)) and "cohere" in str(getattr(config, "model_type", "")):
            logits = logits * scale
        for key in LOGIT_DIVISORS:
            divisor = getattr(config, key, None)
            if isinstance(divisor, (int, float)) and divisor != 1:
                logits = logits / divisor
        cap = next((getattr(config, key) for key in LOGIT_SOFT_CAPS if getattr(config, key, None)), None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def add_at_positions(
    stream: torch.Tensor, vector: torch.Tensor, positions: int | Sequence[int] | slice | None, hidden_size: int
) -> torch.Tensor:
    """``stream`` with ``vector`` added at ``positions`` of its sequence axis (all when None)."""
    if vector.shape[-1] != hidden_size:
        raise ValueError(f"steering vector has width {vector.shape[-1]}, the model's hidden size is {hidden_size}.")
    vector = vector.to(device=stream.device, dtype=stream.dtype)
    if positions is None:
        return stream + vector
    mask = torch.zeros(stream.shape[:-1] + (1,), dtype=stream.dtype, device=stream.device)
    mask[..., positions, :] = 1
    return stream + mask * vector


def _config_value(config: Any, keys: Iterable[str]) -> int:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise AttributeError(f"{type(config).__name__} has none of {list(keys)}")
