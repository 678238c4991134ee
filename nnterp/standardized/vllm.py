"""StandardizedVLLM: the standardized surface on a vLLM engine through nnsight (the engine's machinery lives in
:mod:`nnterp.backends.vllm`; vllm itself is imported only with this module)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from ..backends.vllm.backend import VLLMBackend
from ..backends.vllm.collect import collect_like_local
from ..backends.vllm.embedding_scale import embedding_scale
from ..backends.vllm.engine import (
    close_trace_scope_after_steps,
    cpu_meta_build,
    engine_kwargs,
    expert_group_after_a_dense_engine,
    forget_shared,
    layout_key,
    nnsight_vllm_class,
    share_with_workers,
    shut_down,
    worker_class,
    wrapped_hf_model,
)
from ..backends.vllm.attention import RecomputedAttentionProbabilities
from ..backends.vllm.graphs import accessors_under_graphs, graph_engine_kwargs, nnsight_taps
from ..core.inputs import check_prompts, token_id_prompt
from ..core.padding import in_trace
from ..core.rename import RenameConfig, layer_child, resolve_names, split_rename
from ..core.tokens import token_id_list
from ..core.tracing import CHECK_PROMPT
from .base import StandardizedMixin, infer_layout, refuse_remote
from .source import check_model_source

_VLLM = nnsight_vllm_class()


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
    1.x's arguments mean what they mean on ``StandardizedTransformer``, except ``enable_attention_probs`` (not
    needed: ``attention_probabilities`` recomputes the prompt's patterns from queries and keys, read-only) and
    ``check_attn_probs_with_trace`` (unused).

    The engine runs eagerly unless ``cuda_graphs=True`` (or ``enforce_eager=False``): then vLLM replays breakable
    CUDA graphs and every layer accessor, the token embeddings and the input ids are served at replay (seams
    derived from the standard names); ``cuda_graphs=("layers_output",)`` serves only the accessors named (fewer
    graph breaks). Other reads (attention probabilities, heads, routers, raw modules) raise on such an engine.
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
        cuda_graphs: bool | Sequence[str] = False,
        **vllm_kwargs: Any,
    ) -> None:
        refuse_remote(remote, "StandardizedVLLM")
        config, hints, extra = split_rename(rename, rename_config, vllm_kwargs)
        model = check_model_source(model, "StandardizedVLLM", loaded_ok=False)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        object.__setattr__(self, "_use_tqdm", use_tqdm)  # read by _load_sync, inside super().__init__
        accessors = accessors_under_graphs(cuda_graphs, vllm_kwargs.pop("enforce_eager", None))
        vllm_kwargs = engine_kwargs(vllm_kwargs, trust_remote_code, unsafe_enable_prefix_caching)
        if accessors is not None:
            vllm_kwargs = graph_engine_kwargs(vllm_kwargs, accessors)
            vllm_kwargs["taps"] = accessors  # nnsight's taps: resolved into module locations by _resolve_taps
        object.__setattr__(self, "_graph_setup", (config, hints, extra, accessors))
        expert_group_after_a_dense_engine()
        with cpu_meta_build():
            super().__init__(model, **vllm_kwargs)
        names = resolve_names(self._module, config, hints, extra)
        width = self._module.get_submodule(names.embed_tokens).embedding_dim
        layout = infer_layout(self._module, names, width, "vllm", run=None, architecture=layout_key(self._module))
        _bind_aliases(self, names.nnsight_rename())
        self._init_standard_surface(names, config, VLLMBackend(accessors), layout, model)
        _mount_layer_children(self, names)
        for key, value in (tokenizer_kwargs or {}).items():
            setattr(self.tokenizer, key, value)
        # The renaming check runs traces, which on the async engine finish only when awaited: it is the sync
        # engine's (the layout is still inferred and compared with its reviewed snapshot).
        self._check_loaded(check_layout, check_renaming and not self._async_engine, allow_multimodal)
        if self.dispatched:
            self._freeze_heap()

    @property
    def graph_accessors(self) -> tuple[str, ...] | None:
        """The layer accessors this engine serves under CUDA graphs (``cuda_graphs=...``); None on an eager engine,
        which serves everything."""
        return self._backend.graph_accessors

    def _resolve_taps(self, module: torch.nn.Module) -> tuple[str, ...]:
        """nnsight's tap locations, derived from the standardized names of the graph-served accessors."""
        config, hints, extra, accessors = self.__dict__["_graph_setup"]
        return nnsight_taps(module, resolve_names(module, config, hints, extra), accessors)

    def _load_async(self, repo_id: str, **kwargs: Any) -> Any:
        self._WORKER_CLS = worker_class()
        return super()._load_async(repo_id, **kwargs)

    def dispatch(self) -> None:
        """Starts the engine (after :meth:`close`; a new model starts it at once)."""
        if self.dispatched:
            return
        super().dispatch()
        self._freeze_heap()

    def _freeze_heap(self) -> None:
        """Marks every object alive now static for Python's garbage collector, as vLLM's engine does with its own
        at start: an engine in this process shares its heap with the model's wrappers, which full collections
        between engine steps would walk again (with the collector off, one-layer extraction's engine steps took
        0.37 s instead of 0.57 s at 256 prompts x 32 tokens on an H200)."""
        from vllm.utils.gc_utils import freeze_gc_heap

        freeze_gc_heap()

    def _load_sync(self, repo_id: str, **kwargs: Any) -> Any:
        self._WORKER_CLS = worker_class()
        llm = super()._load_sync(repo_id, **kwargs)
        # nnsight calls llm.generate without use_tqdm, and vLLM's default draws two bars per trace.
        llm.generate = functools.partial(llm.generate, use_tqdm=self._use_tqdm)
        close_trace_scope_after_steps(llm.llm_engine)
        return llm

    def __setstate__(self, state: dict) -> None:
        """Unpickled inside an engine worker: on a pipeline stage, reads and writes go through the stage."""
        super().__setstate__(state)
        from ..backends.vllm.worker import stage_backend

        self._backend = stage_backend(self, self._backend)

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        check_prompts(inputs, self.tokenizer)
        return super()._batch_size(*inputs, **kwargs)

    def _prompt(self, *inputs: Any) -> Any:
        """One request's prompt; token ids may also come as an integer tensor, as on HF."""
        return super()._prompt(*(token_id_prompt(value) for value in inputs))

    def _collect(self, mediators: list, outputs: list) -> None:
        """nnsight's collection, with containers shared by several invokes merged in invoke order and worker
        errors raised with their original type (see ``nnterp.backends.vllm.collect``)."""
        collect_like_local(mediators, outputs, super()._collect)

    logits = _served_by_engine("logits", "This step's logits, one row per request.")
    samples = _served_by_engine("samples", "The token ids sampled this step, one per request.")

    def _load_meta(self, repo_id: str, **kwargs: Any):
        from ..backends.vllm.meta import meta_tree_build

        with meta_tree_build():
            return super()._load_meta(repo_id, **kwargs)

    @property
    def attention_probabilities(self) -> RecomputedAttentionProbabilities:
        """Prompt tokens' attention patterns ``[1, heads, tokens, tokens]``, recomputed from the queries and keys
        vLLM's attention kernel receives (read-only; ``backends/vllm/attention.py``)."""
        if "_attention_probabilities" not in self.__dict__:
            object.__setattr__(self, "_attention_probabilities", RecomputedAttentionProbabilities(self))
        return self.__dict__["_attention_probabilities"]

    @property
    def input_ids(self) -> torch.Tensor:
        """This request's token ids, ``[1, tokens]`` (each invoke is one unpadded prompt); a copy, as the engine
        reuses its input buffer."""
        return self._forward_input("input_ids", 0).to(torch.long, copy=True).reshape(1, -1)

    @property
    def engine_kind(self) -> str:
        """``native`` for vLLM's own implementation, ``transformers-backend`` where vLLM wraps the HF model."""
        return "transformers-backend" if wrapped_hf_model(self._module) is not None else "native"

    @property
    def _embedding_scale(self) -> torch.Tensor | float | None:
        """A factor vLLM applies to ``embed_tokens``' output outside the module where HF scales inside its
        embedding module (Gemma's ``normalizer`` buffer, MiniCPM's ``config.scale_emb``): token_embeddings means
        the scaled value on both. Read off the source of the modules that hold the embedding."""
        return embedding_scale(self._module, self._torch_module("embed_tokens"))

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
        if self._async_engine and kwargs.get("backend") is None:
            from ..backends.vllm.async_trace import AsyncTrace

            kwargs["backend"] = AsyncTrace(self)  # every invoke its own request; await tracer.backend
        share_with_workers(self)
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
        shut_down(entrypoint)
        self.vllm_entrypoint = None
        self.dispatched = False
        forget_shared(self)

    def __enter__(self) -> "StandardizedVLLM":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _run_extraction(self, plan, prompts, batch_size, max_new_tokens, generation_kwargs):
        from ..backends.vllm.extraction import run

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

    def parameter(self, path: str) -> torch.Tensor:
        """See :meth:`StandardizedMixin.parameter`; outside a trace the weights live in the engine, so the gather
        runs as a short engine request."""
        if in_trace():
            return super().parameter(path)
        self._refuse_outside_trace_on_async("parameter")
        with torch.no_grad(), self.trace(CHECK_PROMPT):
            value = self.parameter(path).save()
        return value

    def _project_now(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """The weights live in the engine: project inside a short request."""
        self._refuse_outside_trace_on_async("project_on_vocab")
        with torch.no_grad(), self.trace(CHECK_PROMPT):
            logits = self.project_on_vocab(hidden_state).save()
        return logits

    def _refuse_outside_trace_on_async(self, name: str) -> None:
        if self._async_engine:
            raise RuntimeError(
                f"{name} outside a trace runs a short engine request, which on the async engine would need awaiting: "
                f"call it inside `with model.trace(...)` and await the trace, or use a synchronous StandardizedVLLM."
            )

    def _lm_head_logits(self, normed: torch.Tensor) -> torch.Tensor:
        # vLLM's LM head is only a weight holder for its logits processor: padded past the vocabulary, and
        # sharded under tensor parallelism; the full logical matrix is gathered.
        weight = self._backend.local_parameter(self._torch_module("lm_head"), "weight")[: self.vocab_size]
        return torch.nn.functional.linear(normed, weight.to(normed.dtype))


def _mount_layer_children(model, names) -> None:
    """Bind ``self_attn`` / ``mlp`` on each layer envoy to its native child (the tree is built before names are
    known, so there is no ``rename``)."""
    for standard in ("self_attn", "mlp"):
        for layer in model.layers:
            native = layer_child(layer._module, standard, names)
            if native is not None and native != standard:
                object.__setattr__(layer, standard, getattr(layer, native))



def _bind_aliases(root, rename: dict) -> None:
    """Mount ``rename`` aliases on an envoy tree built before the names were known, as nnsight binds them at
    construction: children first."""
    from nnsight.intervention import aliasing

    for envoy in root.modules():
        object.__setattr__(envoy, "_rename", rename)
        aliasing.bind(envoy)


