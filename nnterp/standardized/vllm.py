"""StandardizedVLLM: the standardized surface on a vLLM engine through nnsight (vllm imported lazily)."""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import json
import os
import textwrap
from typing import Any

import torch

from ..layout import infer_model_layout
from ..rename import RenameConfig, layer_child, resolve_names
from .base import Backend, StandardizedMixin
from .readonly import read_only


class VLLMBackend(Backend):
    """vLLM reuses activation buffers and mutates them in fused kernels: a single-stream read is cloned
    so a saved value is the value at read time; a dual-stream sum is already a fresh tensor. Either way
    the read is not the engine's tensor, so it refuses in-place edits (they would be lost)."""

    name = "vllm"
    batches_prompts = False  # one prompt per trace (each invoke is one request)

    def after_read(self, value: torch.Tensor, fresh: bool, where: str) -> torch.Tensor:
        return read_only(value if fresh else value.clone(), where)

    def local_parameter(self, module: torch.nn.Module, param_name: str) -> torch.Tensor:
        """Gathered over tensor-parallel ranks, vocabulary padding stripped (see ``nnterp.distributed.tp``)."""
        from ..distributed.tp import gather_param

        return gather_param(module, param_name)


CPU_KV_CACHE_BYTES = 2**30


def _vllm_class():
    from nnsight.modeling.vllm import VLLM

    return VLLM


def _no_accelerator() -> bool:
    return not torch.cuda.is_available()


def _cpu_meta_build():
    """vLLM's loader empties the accelerator cache after building the meta tree; without one that raises."""
    if not _no_accelerator():
        return contextlib.nullcontext()
    from .vllm_cpu import no_accelerator_cache

    return no_accelerator_cache()


_VLLM = _vllm_class()


def _served_by_engine(name: str, doc: str) -> property:
    """nnsight's value the engine serves outside any module (``logits``, ``samples``), read and written
    through the backend (on a pipeline stage other than the last: a placeholder, and writes are no-ops)."""
    served = getattr(_VLLM, name)

    def read(self) -> torch.Tensor:
        return self._backend.run_value(f"model.{name}", lambda: served.__get__(self, type(self)))

    def write(self, value: torch.Tensor) -> None:
        self._backend.run_write(lambda new: served.__set__(self, new), value)

    return property(read, write, doc=doc)


class StandardizedVLLM(_VLLM, StandardizedMixin):  # type: ignore[misc]
    """A vLLM engine with standard module names and residual-stream accessors.

    Prefix caching is off (cached tokens skip the forward pass, so interventions would silently miss
    them); pass ``unsafe_enable_prefix_caching=True`` to turn it on anyway. Activations are flat
    ``[tokens, hidden]``; each ``tracer.invoke`` is one prompt.
    """

    def __init__(
        self,
        model: str,
        rename: RenameConfig | None = None,
        check_layout: bool = True,
        unsafe_enable_prefix_caching: bool = False,
        **vllm_kwargs: Any,
    ) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm_kwargs = _translate_hf_kwargs(vllm_kwargs)
        for key, value in json.loads(os.environ.get("NNTERP_VLLM_ARGS", "{}")).items():
            vllm_kwargs.setdefault(key, value)  # machine-wide engine defaults, e.g. an attention backend
        vllm_kwargs["enable_prefix_caching"] = unsafe_enable_prefix_caching
        vllm_kwargs.setdefault("dispatch", True)
        if _no_accelerator():
            # An explicit KV cache: vLLM's CPU worker otherwise sizes it as a fraction of host memory minus this
            # process's resident memory, which fails once the process holds other models (an HF one, say).
            vllm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        with _cpu_meta_build():
            super().__init__(model, **vllm_kwargs)
        names = resolve_names(self._module, rename)
        self.names = names
        self._backend = VLLMBackend()
        width = self._module.get_submodule(names.embed_tokens).embedding_dim
        self.layout = infer_model_layout(self._module, names, width, "vllm", layout_key(self._module), run=None)
        self._init_standard_surface()
        _mount_layer_children(self, names)
        self._check_against_snapshot(check_layout)

    _WORKER_CLS = "nnterp.standardized.vllm_worker.NNterpGPUWorker"

    def _load_sync(self, repo_id: str, **kwargs: Any) -> Any:
        if _no_accelerator():
            self._WORKER_CLS = "nnterp.standardized.vllm_cpu.NNsightCPUWorker"
        return super()._load_sync(repo_id, **kwargs)

    def __setstate__(self, state: dict) -> None:
        """Unpickled inside an engine worker: on a pipeline stage, reads and writes go through the stage."""
        super().__setstate__(state)
        from .vllm_worker import stage_backend

        self._backend = stage_backend(self, self._backend)

    logits = _served_by_engine("logits", "This step's logits, one row per request.")
    samples = _served_by_engine("samples", "The token ids sampled this step, one per request.")

    def _load_meta(self, repo_id: str, **kwargs: Any):
        from .vllm_meta import meta_tree_build

        with meta_tree_build():
            return super()._load_meta(repo_id, **kwargs)

    @property
    def _text_config(self):
        # The module's own config: this also runs inside the engine's worker, where there is no entrypoint.
        config = self._module.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @property
    def attention_probabilities(self):
        from ..attention import AttentionProbabilitiesUnavailable

        raise AttentionProbabilitiesUnavailable(
            "vLLM's attention kernels (paged / flash) never materialize attention probabilities; use "
            "StandardizedTransformer(..., attn_implementation='eager') on the same weights for them."
        )

    @property
    def engine_kind(self) -> str:
        """``native`` for vLLM's own implementation, ``transformers-backend`` where vLLM wraps the HF model."""
        return "transformers-backend" if _wrapped_hf_model(self._module) is not None else "native"

    @property
    def _embedding_scale(self) -> torch.Tensor | float | None:
        """A factor vLLM applies to ``embed_tokens``' output outside the module where HF scales inside its
        embedding module (Gemma's ``normalizer`` buffer, MiniCPM's ``config.scale_emb``): token_embeddings means
        the scaled value on both. Read off the source of the modules that hold the embedding."""
        embed = self._torch_module("embed_tokens")
        for holder in self._module.modules():
            attr = next((name for name, child in holder.named_children() if child is embed), None)
            path = _scale_path(type(holder), attr) if attr is not None else None
            if path is not None:
                value = holder
                for name in path:
                    value = getattr(value, name, None)
                if isinstance(value, (torch.Tensor, float, int)) and not isinstance(value, bool):
                    return value
        return None

    def last_position(self, tensor: torch.Tensor) -> torch.Tensor:
        """vLLM logits are already one row per request at its last position."""
        return tensor

    def as_batch(self, activation: torch.Tensor) -> torch.Tensor:
        """One request's activation as ``[1, tokens, hidden]``: native vLLM models are flat ``[tokens, hidden]``,
        models vLLM runs through its Transformers backend already have the leading 1."""
        return activation if activation.ndim == 3 else activation[None]

    def trace(self, *inputs: Any, **kwargs: Any):
        """A forward pass: greedy and one token unless ``temperature``/``max_tokens`` say otherwise."""
        kwargs.setdefault("temperature", 0.0)
        kwargs.setdefault("max_tokens", 1)
        return super().trace(*inputs, **kwargs)

    def greedy_generation_kwargs(self, max_new_tokens: int) -> dict:
        """Sampling parameters for greedy decoding on the raw logits (the checkpoint's penalties overridden),
        stopping at the model config's end-of-sequence ids as HF's ``generate`` does (vLLM's own stop
        token comes from the tokenizer, which may name another)."""
        eos = self._module.config.eos_token_id
        stop = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return {"max_tokens": max_new_tokens, "temperature": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop_token_ids": stop}

    @property
    def step_token(self) -> torch.Tensor:
        """Inside a generation step: the token the engine sampled, ``[requests]``."""
        return self.samples

    def _lm_head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        # vLLM's LM head is only a weight holder for its logits processor: padded past the vocabulary, and
        # sharded under tensor parallelism; the full logical matrix is gathered.
        weight = self._backend.local_parameter(self._torch_module("lm_head"), "weight")[: self.vocab_size]
        return torch.nn.functional.linear(normed, weight.to(normed.dtype))


@functools.lru_cache(maxsize=None)
def _scale_path(holder_class: type, attr: str) -> tuple[str, ...] | None:
    """The attribute path from ``self`` of the factor the source of ``holder_class`` (or a base class: MiniCPM3's
    model inherits MiniCPM's) multiplies ``self.<attr>(...)`` by, directly or through a name the call's result is
    bound to: ``("config", "scale_emb")``."""
    for klass in holder_class.__mro__:
        if klass.__module__.startswith("torch."):
            break
        path = _scale_path_in(klass, attr)
        if path is not None:
            return path
    return None


def _scale_path_in(klass: type, attr: str) -> tuple[str, ...] | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return None
    for function in (node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)):
        bound = {target.id for node in ast.walk(function) if isinstance(node, ast.Assign) and _calls_self(node.value, attr)
                 for target in node.targets if isinstance(target, ast.Name)}
        for node in ast.walk(function):
            if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult)):
                continue
            for product, factor in ((node.left, node.right), (node.right, node.left)):
                if _calls_self(product, attr) or isinstance(product, ast.Name) and product.id in bound:
                    path = _self_path(factor)
                    if path:
                        return path
    return None


def _calls_self(node: ast.AST, attr: str) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "self")


def _self_path(node: ast.AST) -> tuple[str, ...] | None:
    """``self.a.b`` as ``("a", "b")``; None for anything else."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return tuple(reversed(names)) if names and isinstance(node, ast.Name) and node.id == "self" else None


def _wrapped_hf_model(module: torch.nn.Module) -> torch.nn.Module | None:
    """The HF model vLLM's Transformers backend runs inside ``module`` (None for vLLM's own implementations)."""
    if not type(module).__module__.endswith(".transformers"):
        return None
    return getattr(module, "model", None)


def layout_key(module: torch.nn.Module) -> str:
    """The name the layout of ``module`` is snapshotted under: its class, and for vLLM's Transformers backend
    (one class wrapping any HF model) also the wrapped HF model's class."""
    wrapped = _wrapped_hf_model(module)
    return type(module).__name__ if wrapped is None else f"{type(module).__name__}/{type(wrapped).__name__}"


def _mount_layer_children(model, names) -> None:
    """Bind ``self_attn`` / ``mlp`` on each layer envoy to its native child (the tree is built before names are
    known, so there is no ``rename``)."""
    for standard in ("self_attn", "mlp"):
        for layer in model.layers:
            native = layer_child(layer._module, standard, names)
            if native is not None and native != standard:
                object.__setattr__(layer, standard, getattr(layer, native))


def _translate_hf_kwargs(kwargs: dict) -> dict:
    """Accept the HuggingFace spellings users bring over (``torch_dtype``/``dtype``, ``device_map``)."""
    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if isinstance(kwargs.get("dtype"), torch.dtype):
        kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    kwargs.pop("device_map", None)
    return kwargs
