"""StandardizedVLLM: the standardized surface on a vLLM engine through nnsight (vllm imported lazily)."""

from __future__ import annotations

import ast
import contextlib
import functools
import gc
import json
import logging
import os
from pathlib import Path
import uuid
from typing import Any

import torch

from ..layout.infer import parse_source
from ..rename import RenameConfig, layer_child, resolve_names, split_rename
from ..utils import token_id_list
from .base import Backend, StandardizedMixin, infer_layout, refuse_remote
from .readonly import read_only
from .source import check_model_source
from .vllm_collect import collect_like_local


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
VLLM_NO_PROBABILITIES = (
    "vLLM's attention kernels (paged / flash) never materialize attention probabilities; use "
    "StandardizedTransformer(..., enable_attention_probs=True) on the same weights for them."
)


def _quiet_vllm_logging() -> None:
    """vLLM logs ~45 INFO lines per engine start: WARNING unless the user set ``VLLM_LOGGING_LEVEL``. The
    variable reaches vLLM's logging config and the engine's worker processes; the logger's own level also
    covers what vLLM logs before it applies that config, and a vllm imported before nnterp."""
    level = os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING").upper()
    if level in logging.getLevelNamesMapping():
        logging.getLogger("vllm").setLevel(level)


def _vllm_class():
    _quiet_vllm_logging()
    from nnsight.modeling.vllm import VLLM

    return VLLM


def _no_accelerator() -> bool:
    return not torch.cuda.is_available()


def _expert_group_after_a_dense_engine() -> None:
    """vLLM creates its expert-parallel group when the process's first engine sets up its parallel groups, and
    only for a MoE model: a MoE model loaded after a dense one in the same process (engines run in-process)
    finds none and fails to build. On a single-rank world, create it then over that rank, as vLLM would have."""
    from vllm.distributed import parallel_state

    if parallel_state._EP is not None or not parallel_state.model_parallel_is_initialized():
        return
    world = parallel_state.get_world_group()
    if world.world_size != 1:
        return  # a multi-rank world sets its groups up once, with the model it was made for
    backend = torch.distributed.get_backend(world.device_group)
    parallel_state._EP = parallel_state.init_model_parallel_group([[world.rank]], world.local_rank, backend,
                                                                  group_name="ep")


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
    ``[tokens, hidden]``; each ``tracer.invoke`` is one prompt. vLLM's per-call progress bars ("Rendering
    prompts", "Processed prompts") are off unless ``use_tqdm=True``.

    ``model`` is a model directory, hub id or GGUF file; other keyword arguments go to the engine. nnterp
    1.x's arguments mean what they mean on ``StandardizedTransformer``, except ``enable_attention_probs=True``
    (vLLM never materializes the probabilities: an error) and ``check_attn_probs_with_trace`` (unused).
    """

    def __init__(
        self,
        model: str | Path,
        trust_remote_code: bool = False,
        check_renaming: bool = True,
        remote: bool = False,
        allow_dispatch: bool = True,
        enable_attention_probs: bool = False,
        check_attn_probs_with_trace: bool = True,
        allow_multimodal: bool = False,
        rename_config: RenameConfig | None = None,
        *,
        rename: RenameConfig | dict | None = None,
        tokenizer_kwargs: dict | None = None,
        check_layout: bool = True,
        unsafe_enable_prefix_caching: bool = False,
        use_tqdm: bool = False,
        **vllm_kwargs: Any,
    ) -> None:
        refuse_remote(remote, "StandardizedVLLM")
        if enable_attention_probs:
            from ..attention import AttentionProbabilitiesUnavailable

            raise AttentionProbabilitiesUnavailable(VLLM_NO_PROBABILITIES)
        config, hints, extra = split_rename(rename, rename_config, vllm_kwargs)
        model = check_model_source(model, "StandardizedVLLM", loaded_ok=False)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        object.__setattr__(self, "_use_tqdm", use_tqdm)  # read by _load_sync, inside super().__init__
        if vllm_kwargs.get("enable_prefix_caching"):
            raise ValueError(
                "StandardizedVLLM keeps vLLM's prefix caching off: tokens served from the cache skip the forward "
                "pass, so reads would miss them and interventions would silently not apply to them. To turn it on "
                "anyway, pass unsafe_enable_prefix_caching=True instead of enable_prefix_caching=True."
            )
        vllm_kwargs = _translate_hf_kwargs(vllm_kwargs)
        if trust_remote_code:
            vllm_kwargs["trust_remote_code"] = True
        for key, value in json.loads(os.environ.get("NNTERP_VLLM_ARGS", "{}")).items():
            vllm_kwargs.setdefault(key, value)  # machine-wide engine defaults, e.g. an attention backend
        vllm_kwargs["enable_prefix_caching"] = unsafe_enable_prefix_caching
        vllm_kwargs.setdefault("dispatch", True)
        if _no_accelerator():
            # An explicit KV cache: vLLM's CPU worker otherwise sizes it as a fraction of host memory minus this
            # process's resident memory, which fails once the process holds other models (an HF one, say).
            vllm_kwargs.setdefault("kv_cache_memory_bytes", CPU_KV_CACHE_BYTES)
        _expert_group_after_a_dense_engine()
        with _cpu_meta_build():
            super().__init__(model, **vllm_kwargs)
        names = resolve_names(self._module, config, hints, extra)
        width = self._module.get_submodule(names.embed_tokens).embedding_dim
        layout = infer_layout(self._module, names, width, "vllm", run=None, architecture=layout_key(self._module))
        _bind_aliases(self, names.nnsight_rename())
        self._init_standard_surface(names, config, VLLMBackend(), layout, model)
        _mount_layer_children(self, names)
        for key, value in (tokenizer_kwargs or {}).items():
            setattr(self.tokenizer, key, value)
        self._check_loaded(check_layout, check_renaming, allow_multimodal)

    _WORKER_CLS = "nnterp.standardized.vllm_worker.NNterpGPUWorker"

    def _load_sync(self, repo_id: str, **kwargs: Any) -> Any:
        if _no_accelerator():
            self._WORKER_CLS = "nnterp.standardized.vllm_cpu.NNsightCPUWorker"
        llm = super()._load_sync(repo_id, **kwargs)
        # nnsight calls llm.generate without use_tqdm, and vLLM's default draws two bars per trace.
        llm.generate = functools.partial(llm.generate, use_tqdm=self._use_tqdm)
        return llm

    def __setstate__(self, state: dict) -> None:
        """Unpickled inside an engine worker: on a pipeline stage, reads and writes go through the stage."""
        super().__setstate__(state)
        from .vllm_worker import stage_backend

        self._backend = stage_backend(self, self._backend)

    def _collect(self, mediators: list, outputs: list) -> None:
        """nnsight's collection, with containers shared by several invokes merged in invoke order and worker
        errors raised with their original type (see ``vllm_collect``)."""
        collect_like_local(mediators, outputs, super()._collect)

    logits = _served_by_engine("logits", "This step's logits, one row per request.")
    samples = _served_by_engine("samples", "The token ids sampled this step, one per request.")

    def _load_meta(self, repo_id: str, **kwargs: Any):
        from .vllm_meta import meta_tree_build

        with meta_tree_build():
            return super()._load_meta(repo_id, **kwargs)

    @property
    def attention_probabilities(self):
        from ..attention import AttentionProbabilitiesUnavailable

        raise AttentionProbabilitiesUnavailable(VLLM_NO_PROBABILITIES)

    attn_probs_available = False

    @property
    def input_ids(self) -> torch.Tensor:
        """This request's token ids, ``[1, tokens]`` (each invoke is one unpadded prompt); a copy, as the engine
        reuses its input buffer."""
        return self._forward_input("input_ids", 0).to(torch.long, copy=True).reshape(1, -1)

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

    def last_position(self, tensor: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The request's last token, ``[1, ...]``: the last row of a flat ``[tokens, ...]`` activation (or of
        ``[1, tokens, ...]``); logits, one row per request, are already at it. vLLM never pads a prompt."""
        return self.as_batch(tensor)[:, -1]

    def trace_attention_mask(self) -> None:
        """None: each invoke is one unpadded prompt."""
        return None

    def as_batch(self, activation: torch.Tensor) -> torch.Tensor:
        """One request's activation as ``[1, tokens, hidden]``: native vLLM models are flat ``[tokens, hidden]``,
        models vLLM runs through its Transformers backend already have the leading 1."""
        return activation if activation.ndim == 3 else activation[None]

    _extractions_running = 0  # extract() generators stepping the engine right now

    def trace(self, *inputs: Any, **kwargs: Any):
        """A forward pass: greedy and one token unless ``temperature``/``max_tokens`` say otherwise."""
        if self._extractions_running:
            raise RuntimeError(
                "An extract() generator is still running on this engine, and a trace would run its requests "
                "too. Consume or close it (`results.close()`) before tracing."
            )
        kwargs.setdefault("temperature", 0.0)
        kwargs.setdefault("max_tokens", 1)
        self._share_with_workers()
        return super().trace(*inputs, **kwargs)

    def close(self) -> None:
        """Shut the engine down and release its memory (weights, KV cache, worker processes). vLLM keeps an
        engine alive until it is shut down, even after the last reference to the model is gone; a trace after
        ``close()`` starts a new engine. ``with StandardizedVLLM(...) as model:`` closes it on leaving."""
        entrypoint = self.vllm_entrypoint
        if entrypoint is None:
            return
        if self._extractions_running:
            raise RuntimeError("close(): an extract() generator is still running on this engine; consume or close it first.")
        core = getattr(getattr(entrypoint, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        else:
            entrypoint.shutdown()
        self.vllm_entrypoint = None
        self.dispatched = False
        for key in _SHARING_STATE:
            self.__dict__.pop(key, None)
        gc.collect()

    def __enter__(self) -> "StandardizedVLLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _share_with_workers(self) -> None:
        """Ship this model to the engine's workers once, and make trace requests refer to that copy.

        Each request otherwise pickles the whole envoy tree (one envoy per module) and the worker unpickles it:
        most of a trace request's fixed cost. The copy is shipped again when the model's attributes change
        (a trace body may read them). Off under pipeline parallelism, where each request's copy gets a stage
        backend of its own."""
        engine = getattr(self.vllm_entrypoint, "llm_engine", None)
        if engine is None or engine.vllm_config.parallel_config.pipeline_parallel_size > 1:
            return
        fingerprint = tuple((name, id(value)) for name, value in self.__dict__.items() if name not in _SHARING_STATE)
        shared = self.__dict__.get("_persistent_id")
        if shared is not None and self.__dict__.get("_shared_fingerprint") == fingerprint:
            return
        from nnsight.intervention.serialization import dumps

        self.__dict__.pop("_persistent_id", None)  # pickle the model itself this once
        key = f"nnterp:StandardizedVLLM:{uuid.uuid4().hex}"
        engine.collective_rpc("nnterp_share_model", args=(key, dumps(self), shared))
        self.__dict__["_persistent_id"] = key
        self.__dict__["_shared_fingerprint"] = fingerprint

    def _run_extraction(self, plan, prompts, batch_size, max_new_tokens, generation_kwargs):
        from ..extraction.vllm import run

        return run(self, plan, prompts, batch_size or len(prompts), max_new_tokens, generation_kwargs)

    def greedy_generation_kwargs(self, max_new_tokens: int) -> dict:
        """Sampling parameters for greedy decoding on the raw logits (the checkpoint's penalties overridden),
        stopping at the model config's end-of-sequence ids as HF's ``generate`` does (vLLM's own stop
        token comes from the tokenizer, which may name another)."""
        stop = token_id_list(self._module.config.eos_token_id)
        return {"max_tokens": max_new_tokens, "temperature": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "stop_token_ids": stop}

    @property
    def step_token(self) -> torch.Tensor:
        """Inside a generation step: the token the engine sampled, ``[requests]``."""
        return self.samples

    def _project_now(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """The weights live in the engine: project inside a short request."""
        from .checks import CHECK_PROMPT

        with torch.no_grad(), self.trace(CHECK_PROMPT):
            logits = self.project_on_vocab(hidden_state).save()
        return logits

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
    tree = parse_source(klass)
    if tree is None:
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

_SHARING_STATE = ("_persistent_id", "_shared_fingerprint")


def _bind_aliases(root, rename: dict) -> None:
    """Mount ``rename`` aliases on an envoy tree built before the names were known, as nnsight binds them at
    construction: children first."""
    from nnsight.intervention import aliasing

    for envoy in root.modules():
        object.__setattr__(envoy, "_rename", rename)
        aliasing.bind(envoy)


def _translate_hf_kwargs(kwargs: dict) -> dict:
    """Accept the HuggingFace spellings users bring over (``torch_dtype``/``dtype``, ``device_map``)."""
    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if isinstance(kwargs.get("dtype"), torch.dtype):
        kwargs["dtype"] = str(kwargs["dtype"]).removeprefix("torch.")
    kwargs.pop("device_map", None)
    return kwargs
