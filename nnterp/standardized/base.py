"""The standardized surface shared by every backend."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from ..core.accessors import LayerAccessor, ModuleListView
from ..core.heads import HeadsAccessor
from ..core.routers import RoutersAccessor
from ..core.forward_order import in_forward_order, record_access
from ..core.layout import LayoutError, ModelLayout, check_same_shape, drift, infer_model_layout, load_snapshot
from ..core.layout.model import copy_if
from ..core.layout.infer import returned_tuple_length
from ..core.backend import EMBEDDINGS, HEAD, Backend
from ..core.padding import at_last_token, current_attention_mask, in_trace
from ..core.rename import SEQUENCE, ModuleNames, RenameConfig, RenamingError, envoy_path, layer_child, text_config
from .checks import check_renaming as check_standard_modules
from ..core.positions import Positions, chosen_tokens

if TYPE_CHECKING:
    from ..backends.taps.rows import Activations

logger = logging.getLogger("nnterp")

# Config keys of a factor the logits (or the bias-free LM head's input) are divided by: Granite's
# `logits_scaling`, Inkling's muP width multiplier.
LOGIT_DIVISORS = ("logits_scaling", "logits_mup_width_multiplier")
# Config keys of the soft cap applied to the logits: Gemma 2/3, RecurrentGemma, xLSTM.
LOGIT_SOFT_CAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


class LayoutDriftWarning(UserWarning):
    """The inferred layout differs from the reviewed snapshot under ``layouts/``."""


def infer_layout(
    module: torch.nn.Module, names: ModuleNames, hidden_size: int, backend: str, run: Any, architecture: str | None = None
) -> ModelLayout:
    """The model's layout, snapshotted under ``architecture`` (default: the module's class); a module that does
    not carry the residual stream where its standard name says raises ``RenamingError`` (the name likely points
    at the wrong module)."""
    try:
        return infer_model_layout(module, names, hidden_size, backend, architecture or type(module).__name__, run)
    except LayoutError as error:
        raise RenamingError(
            f"{error} The module taken for this standard name is probably the wrong one: name the right one in a "
            "RenameConfig (attn_name=..., mlp_name=..., layers_name=...)."
        ) from error


def first_config_int(config: Any, keys) -> int | None:
    """The first of ``keys`` that ``config`` sets to an integer."""
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def refuse_remote(remote: bool, loader: str) -> None:
    """nnterp 1.x's ``remote=True`` (NDIF remote execution) cannot be honoured: say so instead of ignoring it."""
    if remote:
        raise NotImplementedError(
            f"{loader}(..., remote=True): remote execution on NDIF is not available in nnterp; its models run in "
            "this process. Load the model locally (remote=False, the default)."
        )


VLLM_ONE_PROMPT = " (on vLLM each invoke is one prompt: call steer inside the invoke of the prompt to steer)"


class StandardizedMixin:
    """Accessors and helpers over ``self.names`` / ``self.layout`` / ``self._backend`` / ``self._rename_config``,
    which subclasses set through ``_init_standard_surface`` once their model is loaded."""

    names: ModuleNames
    layout: ModelLayout
    _backend: Backend
    _rename_config: RenameConfig
    _tokenizer_source: str | None = None

    @property
    def _text_config(self):
        """The language model's config (read off the module: inside a vLLM worker there is no entrypoint)."""
        return text_config(self._module.config)

    def _init_standard_surface(
        self, names: ModuleNames, rename_config: RenameConfig, backend: Backend, layout: ModelLayout, tokenizer_source: str | None
    ) -> None:
        self.names, self._rename_config, self._backend, self.layout = names, rename_config, backend, layout
        self._tokenizer_source = tokenizer_source
        self._mount_root_names()
        self.layers_input = LayerAccessor(self, "layer", "input")
        self.layers_output = LayerAccessor(self, "layer", "output")
        self.attentions_input = LayerAccessor(self, "self_attn", "input")
        self.attentions_output = LayerAccessor(self, "self_attn", "output")
        self.mlps_input = LayerAccessor(self, "mlp", "input")
        self.mlps_output = LayerAccessor(self, "mlp", "output")
        self.heads_output = HeadsAccessor(self)
        self.routers_output = RoutersAccessor(self)
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

    def _check_loaded(self, check_layout: bool, check_renaming: bool, allow_multimodal: bool) -> None:
        """The load-time checks: layout against the reviewed snapshot, then the renaming (``checks``)."""
        self._check_against_snapshot(check_layout)
        if check_renaming:
            check_standard_modules(self, allow_multimodal)

    @property
    def _model(self) -> torch.nn.Module:
        """The wrapped torch model (nnterp 1.x's name for nnsight's ``_module``)."""
        return self._module

    # -- sizes -------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self._torch_module("layers"))

    @property
    def hidden_size(self) -> int:
        """From ``RenameConfig(hidden_size_config_key=...)``, the config, else the embedding width."""
        return self._config_size("hidden_size", lambda: getattr(self._torch_module("embed_tokens"), "embedding_dim", None))

    @property
    def num_heads(self) -> int | None:
        """From ``RenameConfig(attn_head_config_key=...)`` or the config; None when neither says."""
        return self._config_size("num_heads")

    @property
    def vocab_size(self) -> int | None:
        """From ``RenameConfig(vocab_size_config_key=...)`` or the config; None when neither says."""
        return self._config_size("vocab_size")

    def _config_size(self, size: str, fallback: Callable[[], int | None] | None = None) -> int | None:
        keys, given = self._rename_config.config_keys(size)
        if given is not None:
            return given
        value = first_config_int(self._text_config, keys)
        if value is not None:
            return value
        return fallback() if fallback is not None else None

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

    # -- per-head results ----------------------------------------------------------

    def head_results(self, layer: int) -> torch.Tensor:
        """Each head's contribution to the stream at ``layer`` (inside a trace): ``heads_output[layer]`` through
        its slice of the output projection, ``[..., heads, hidden]`` (``[batch, seq, ...]`` on HF, a request's
        ``[tokens, ...]`` on vLLM). Summed over heads, plus the projection's bias, it is the projection's output
        (``attentions_output[layer]`` where the attention returns it unchanged)."""
        return self.project_heads(layer, self.heads_output[layer], during_forward=True)

    def project_heads(self, layer: int, heads: torch.Tensor, during_forward: bool = False) -> torch.Tensor:
        """``heads`` (``[..., heads, head_dim]``, as ``heads_output[layer]`` reads) through layer ``layer``'s output
        projection one head at a time, bias excluded: ``[..., heads, hidden]``. The projection module itself runs
        (whatever its weight format), so it works where an engine repacks weights."""
        layer, projection = self.heads_output.projection(layer)
        module = projection._module
        count = heads.shape[-2]
        alone = (heads.unsqueeze(-3) * torch.eye(count, dtype=heads.dtype, device=heads.device)[:, :, None]).flatten(-2)
        weight = getattr(module, "weight", None)
        if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
            return alone @ weight
        if isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.shape[-1] == alone.shape[-1]:
            return torch.nn.functional.linear(alone, weight)
        if during_forward:
            raise RuntimeError(
                f"head_results({layer}): the output projection ({type(module).__name__}) keeps no plain weight on this "
                "engine (vLLM's CPU backend repacks it), and it cannot run again while the forward pass is inside "
                "it. Cache heads_output and use run_with_cache(...)[1].stack_head_results(), which runs the "
                "projection in a request of its own.")
        # an engine's own linear layer whose weight was repacked: its forward
        flat = alone.reshape(-1, alone.shape[-1])
        base = _first(module.forward(torch.zeros_like(flat[:1])))
        return (_first(module.forward(flat)) - base).reshape(*alone.shape[:-1], -1)

    def experts_chosen(self, layer: int) -> torch.Tensor:
        """The experts layer ``layer``'s router chose for each token (inside a trace; see ``routers_output``)."""
        return self.routers_output.experts_chosen(layer)

    # -- caches --------------------------------------------------------------------

    def run_with_cache(self, prompts, names=None, layers=None):
        """``logits, cache``: the logits ``[batch, seq, vocab]`` of ``prompts`` and an
        :class:`~nnterp.standardized.cache.ActivationCache` of the accessors ``names`` at ``layers`` (default: the
        stream entering layer 0 and ``attentions_output``, ``mlps_output``, ``layers_output`` of every layer), read
        in one trace. Both are ``[batch, seq, ...]`` padded on the left (on HF as the model pads its batches), with
        zeros at padding positions; ``cache.attention_mask`` marks the real tokens."""
        from .cache import run_with_cache

        return run_with_cache(self, prompts, names, layers)

    # -- extraction --------------------------------------------------------------

    def extract(
        self,
        prompts: Sequence[str | Sequence[int]],
        layers: int | Sequence[int] | None = None,
        accessors: str | Sequence[str] = ("layers_output",),
        batch_size: int | None = None,
        max_new_tokens: int = 0,
        progress: bool = True,
        **generation_kwargs: Any,
    ) -> Iterator["Activations"]:
        """Activations of many prompts, one :class:`~nnterp.extraction.Activations` per prompt, in prompt
        order, as they are computed (``save_activations`` writes them to safetensors shards).

        ``values[accessor]`` is ``[len(layers), tokens, hidden]`` on the CPU: the same values the accessor
        reads in a trace of that prompt alone (``as_batch(...)[0]``), read through plain forward hooks over
        whole batches. ``layers=None`` is every layer. ``batch_size``: prompts per forward pass on HF (default
        32); prompts queued in the engine ahead of the consumer on vLLM (default: all). ``max_new_tokens``
        generates greedily (extra keyword arguments go to the engine's sampling / ``generate``) and adds the
        rows of the generated tokens but the last (the model never runs on it)."""
        from ..backends.taps.plan import plan_extraction

        plan = plan_extraction(self, accessors, layers)
        if not prompts or isinstance(prompts, str):
            raise TypeError("extract takes a list of prompts (strings or token-id lists), e.g. extract([prompt]).")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}.")
        results = self._run_extraction(plan, prompts, batch_size, max_new_tokens, generation_kwargs)
        return _with_progress(results, len(prompts), progress)

    def _run_extraction(self, plan, prompts, batch_size, max_new_tokens, generation_kwargs) -> Iterator["Activations"]:
        raise NotImplementedError(f"{type(self).__name__} does not implement extraction.")

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
            record_access("model.token_embeddings")
            return self._backend.remote_read("model.token_embeddings", EMBEDDINGS)
        output = in_forward_order("model.token_embeddings", lambda: self.embed_tokens.output)
        output, fresh = copy_if(self.layout.embeddings_edited_in_place, output)
        scale = self._embedding_scale
        if scale is None:
            return self._backend.after_read(output, fresh=fresh, where="model.token_embeddings")
        return self._backend.after_read(output * scale, fresh=True, where="model.token_embeddings")

    @token_embeddings.setter
    def token_embeddings(self, value: torch.Tensor) -> None:
        from ..core.layout import check_same_shape

        if not self._backend.owns(EMBEDDINGS):
            return  # the stage that runs the embeddings applies the write
        check_same_shape(in_forward_order("model.token_embeddings", lambda: self.embed_tokens.output), value,
                         "token_embeddings")
        scale = self._embedding_scale
        value = copy_if(self.layout.embeddings_edited_in_place, value)[0]
        self.embed_tokens.output = self._backend.before_write(value if scale is None else value / scale)

    @property
    def _embedding_scale(self) -> torch.Tensor | None:
        """A factor the engine applies to ``embed_tokens``' output outside the module (None: none)."""
        return None

    @property
    def next_token_probs(self) -> torch.Tensor:
        """Softmax over the vocabulary at each prompt's last real token, shape ``[batch, vocab]``."""
        return self.last_position(self.logits).float().softmax(-1)

    def last_position(self, tensor: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Each prompt's last real token of a ``[batch, seq, ...]`` activation or logits, ``[batch, ...]``.

        Inside a trace the prompts' padding (left or right) comes from the attention mask the forward received;
        outside one, pass the batch's ``attention_mask`` (a single prompt or a left-padding tokenizer needs none).
        """
        if attention_mask is None:
            if in_trace():
                attention_mask = self.trace_attention_mask()
            elif tensor.shape[0] > 1 and getattr(self.tokenizer, "padding_side", "left") != "left":
                raise ValueError(
                    "last_position outside a trace: the tokenizer pads on the right, so each prompt's last token "
                    "depends on its length; pass attention_mask=... (the batch's mask) or call it inside the trace."
                )
        return at_last_token(tensor, attention_mask)

    def trace_attention_mask(self) -> torch.Tensor | None:
        """Inside a trace: the attention mask of this invoke's prompts as the forward received them,
        ``[batch, seq]`` (1: a token of the prompt, 0: padding); None when the forward got no mask."""
        return current_attention_mask()

    def as_batch(self, activation: torch.Tensor) -> torch.Tensor:
        """An activation as ``[batch, seq, hidden]`` (the HF layout already is)."""
        return activation

    def skip_layers(
        self,
        start_layer: int,
        end_layer: int | None = None,
        skip_with: torch.Tensor | None = None,
        layer_returns_tuple: bool | None = None,
    ) -> None:
        """Skip layers ``start_layer..end_layer`` (inclusive, inside a trace): each outputs ``skip_with``, by
        default the residual stream entering ``start_layer``. ``layer_returns_tuple`` is accepted for nnterp 1.x
        code and not needed: the layout says what each layer returns."""
        end_layer = start_layer if end_layer is None else end_layer
        first = self._check_layer_index(start_layer, "skip_layers")
        last = self._check_layer_index(end_layer, "skip_layers")
        if last < first:
            raise ValueError(f"skip_layers: end_layer ({end_layer}) comes before start_layer ({start_layer}).")
        if not any(self._backend.owns(index) for index in range(first, last + 1)):
            return  # all of them run on other pipeline stages
        stream = self.layers_input[first]
        if skip_with is not None:
            if isinstance(skip_with, (tuple, list)):
                skip_with = skip_with[0]  # nnterp 1.x took a layer's whole tuple output
            check_same_shape(stream, skip_with, f"skip_layers({start_layer}, {end_layer}, skip_with=...)")
            stream = self._backend.before_write(skip_with)
        for index in range(first, last + 1):
            if not self._backend.owns(index):
                continue  # another pipeline stage skips its own layers
            envoy = self.layers[index]
            layout = self.layout.for_module("layer", envoy._module)
            envoy.skip(layout.output.build(stream, returned_tuple_length(type(envoy._module))))

    def skip_layer(self, layer: int, skip_with: torch.Tensor | None = None) -> None:
        """Skip one layer (inside a trace): it outputs ``skip_with``, by default its own input."""
        self.skip_layers(layer, layer, skip_with)

    def steer(
        self,
        layers: int | Sequence[int],
        steering_vector: torch.Tensor,
        factor: float = 1,
        positions: Positions = None,
        token_positions: Positions = None,
        batch_index: Positions = None,
    ) -> None:
        """Add ``factor * steering_vector`` to the output of each layer in ``layers`` (inside a trace).

        ``steering_vector`` is ``[hidden]`` (one direction for every prompt) or ``[prompts, hidden]`` (one per
        prompt of the trace, or of the invoke inside ``tracer.invoke``; on vLLM an invoke is one prompt).
        ``token_positions`` (int, list, slice or tensor; None: every position) index each prompt's own tokens,
        padding excluded, whatever the padding side: 0 is a prompt's first real token and -1 its last, so
        a prompt steers the same in a padded batch as alone. In a generation step after the first, they
        index the tokens that step processes. ``batch_index`` (None: every prompt) picks prompts of the
        batch (of the invoke, inside ``tracer.invoke``); on vLLM each invoke is one prompt, so it can only be
        0. ``positions`` is the deprecated spelling of ``token_positions``.
        """
        if positions is not None:
            if token_positions is not None:
                raise ValueError("Cannot specify both `positions` (deprecated) and `token_positions`.")
            warnings.warn("`positions` is deprecated, use `token_positions` instead.", DeprecationWarning, stacklevel=2)
            token_positions = positions
        ndim = getattr(steering_vector, "ndim", None)  # a tensor, or another pipeline stage's placeholder for one
        if ndim not in (1, 2) or steering_vector.shape[-1] != self.hidden_size:
            shape = tuple(steering_vector.shape) if hasattr(steering_vector, "shape") else type(steering_vector).__name__
            raise ValueError(
                f"steer: the steering vector has shape {shape} and the model's hidden size is {self.hidden_size}; steer "
                f"takes [hidden], one direction for every prompt, or [prompts, hidden], one per prompt. To add other "
                f"vectors at other "
                f"tokens, assign layers_output[i] = layers_output[i] + delta with delta shaped like the stream."
            )
        indices = sorted({self._check_layer_index(layer, "steer") for layer in ([layers] if isinstance(layers, int) else layers)})
        chooses_tokens = token_positions is not None or batch_index is not None
        mask = None  # the chosen tokens, the same at every layer of this forward pass
        for layer in indices:  # forward order, as a trace must read them
            if not self._backend.owns(layer):
                continue  # the pipeline stage that runs this layer steers it
            stream = self.layers_output[layer]
            batched = self.as_batch(stream)
            delta = self._per_prompt(factor * steering_vector, batched.shape[0]).to(device=stream.device, dtype=stream.dtype)
            if chooses_tokens:
                if mask is None:
                    mask = self._steering_mask(batched.shape[:2], token_positions, batch_index)
                delta = mask[..., None].to(stream) * delta
            self.layers_output[layer] = (batched + delta).reshape(stream.shape)

    def _per_prompt(self, vector: torch.Tensor, prompts: int) -> torch.Tensor:
        """A ``[hidden]`` or ``[prompts, hidden]`` steering vector, broadcastable over ``[prompts, tokens, hidden]``."""
        if vector.ndim == 1:
            return vector
        if vector.shape[0] != prompts:
            where = "this invoke" if self._backend.batches_prompts else "this request (on vLLM an invoke is one prompt)"
            raise ValueError(
                f"steer: the steering vector has shape {tuple(vector.shape)}, one row per prompt, but {where} has "
                f"{prompts} prompt(s). Pass [hidden] for one direction everywhere or [{prompts}, hidden]."
            )
        return vector[:, None, :]

    def _steering_mask(self, batch_and_tokens: torch.Size, token_positions: Positions, batch_index: Positions) -> torch.Tensor:
        """``[batch, tokens]``: True at the chosen prompts' chosen real tokens of this forward pass."""
        note = "" if self._backend.batches_prompts else VLLM_ONE_PROMPT
        return chosen_tokens(self._real_tokens(batch_and_tokens), token_positions, batch_index, note)

    def _real_tokens(self, batch_and_tokens: torch.Size) -> torch.Tensor:
        """``[batch, tokens]``: which tokens of an activation of this forward pass are real (not padding). The
        forward's attention mask covers the prompts; a generation step after the first processes only new
        tokens, all real."""
        mask = self.trace_attention_mask()
        if mask is None or tuple(mask.shape) != tuple(batch_and_tokens):
            return torch.ones(batch_and_tokens, dtype=torch.bool)
        return mask.bool()

    # -- inputs ---------------------------------------------------------------

    def _forward_input(self, name: str, position: int | None = None) -> torch.Tensor | None:
        """An argument of the model's own forward call this pass (inside a trace)."""
        args, kwargs = self.inputs
        if kwargs.get(name) is not None:
            return kwargs[name]
        return args[position] if position is not None and len(args) > position else None

    @property
    def input_ids(self) -> torch.Tensor:
        """The token ids of this forward pass, ``[batch, tokens]`` (inside a trace)."""
        return self._forward_input("input_ids", 0)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[batch, tokens]``, 1 for real tokens and 0 for padding (inside a trace)."""
        mask = self._forward_input("attention_mask")
        return torch.ones_like(self.input_ids) if mask is None else mask

    @property
    def input_size(self) -> torch.Size:
        """``(batch, tokens)`` of this forward pass (inside a trace)."""
        return self.input_ids.shape

    @property
    def add_prefix_false_tokenizer(self):
        """The model's tokenizer loaded with ``add_prefix_space=False``."""
        if getattr(self, "_add_prefix_false_tokenizer", None) is None:
            from transformers import AutoTokenizer

            if self._tokenizer_source is None:
                raise ValueError("add_prefix_false_tokenizer: this model was loaded without a path to load its tokenizer from.")
            self._add_prefix_false_tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_source, add_prefix_space=False)
        return self._add_prefix_false_tokenizer

    def detect_layer_output_type(self) -> None:
        """Kept for nnterp 1.x code: layouts are inferred at load, so ``layers_output.returns_tuple`` is already known."""

    @property
    def attn_probs_available(self) -> bool:
        return self.attention_probabilities.enabled

    # -- vocabulary -------------------------------------------------------------

    def project_on_vocab(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """Logits of a residual-stream tensor: final norm, LM head, and the model's logit post-processing. Inside
        a trace or outside one (on vLLM, outside a trace, the projection runs as a short engine request)."""
        if not in_trace():
            return self._project_now(hidden_state)
        return self._backend.compute_at("model.project_on_vocab", HEAD, self._project, hidden_state)

    def _project(self, stream: torch.Tensor) -> torch.Tensor:
        return self.postprocess_logits(self._lm_head_logits(self._final_normed(stream)))

    def _final_normed(self, stream: torch.Tensor) -> torch.Tensor:
        """``ln_final`` applied to a residual-stream tensor (where the weights are)."""
        normed = self._torch_module("ln_final")(stream)
        if isinstance(normed, tuple):
            normed = normed[0]  # vLLM's Command-R norm returns (normed, residual) even without a residual
        return normed

    def _project_now(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """``project_on_vocab`` outside a trace (the weights are in this process)."""
        with torch.no_grad():
            return self._project(hidden_state)

    def probs_to_dict(self, tokens: torch.Tensor, probs: torch.Tensor) -> dict[str, float]:
        """``{token string: probability}`` for paired token ids and probabilities."""
        return {token: float(prob) for token, prob in zip(self.tokenizer.convert_ids_to_tokens(tokens.tolist()), probs)}

    def get_topk_closest_tokens(self, hidden_state: torch.Tensor, k: int = 5) -> dict[str, float] | list[dict[str, float]]:
        """The ``k`` most probable tokens of ``project_on_vocab(hidden_state)``: ``{token: probability}`` for a
        ``[hidden]`` vector, one such dict per row for ``[n, hidden]``."""
        if hidden_state.ndim not in (1, 2):
            raise ValueError(f"get_topk_closest_tokens takes a [hidden] or [n, hidden] tensor, got shape {tuple(hidden_state.shape)}.")
        if hidden_state.shape[-1] != self.hidden_size:
            raise ValueError(f"Hidden state shape {tuple(hidden_state.shape)} does not match the model's hidden size {self.hidden_size}.")
        probs = self._project_now(hidden_state).float().softmax(-1)
        top = torch.topk(probs, k=k, dim=-1)
        if hidden_state.ndim == 1:
            return self.probs_to_dict(top.indices, top.values)
        return [self.probs_to_dict(indices, values) for indices, values in zip(top.indices, top.values)]

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


def _first(output):
    """A module's output tensor (vLLM's linear layers return ``(output, bias)``)."""
    return output[0] if isinstance(output, tuple) else output


def _with_progress(results: Iterator, total: int, progress: bool) -> Iterator:
    from tqdm.auto import tqdm

    with tqdm(total=total, disable=not progress, desc="extract", unit="prompt") as bar:
        try:
            for item in results:
                yield item
                bar.update()
        finally:
            results.close()  # an abandoned extraction releases the engine's requests and hooks
