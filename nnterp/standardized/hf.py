"""StandardizedTransformer: the standardized surface on a HuggingFace model through nnsight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from nnsight.modeling.transformers import TransformersModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..core.attention import AttentionProbabilities, eager_for_probabilities
from ..core.inputs import check_prompts
from ..core.layout import confirm_final_norm
from ..backends.hf.batcher import AttentionMaskBatcher, left_padding_shifts_positions
from ..backends.hf.text_batch import batch_text_prompts
from ..core.rename import DEFAULT_CONFIG_KEYS, RenameConfig, resolve_names, split_rename, text_config
from ..core.backend import Backend
from .base import StandardizedMixin, first_config_int, infer_layout, logger, refuse_remote
from .source import check_model_source

PROBE_TOKENS = 6
# transformers' generation settings that add logit processors or sampling, each at its neutral value.
RAW_GREEDY = {
    "do_sample": False, "num_beams": 1, "temperature": None, "top_k": None, "top_p": None, "min_p": None,
    "typical_p": None, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "min_length": 0,
    "min_new_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "guidance_scale": None,
    "renormalize_logits": False, "remove_invalid_values": False, "watermarking_config": None,
}


class StandardizedTransformer(TransformersModel, StandardizedMixin):
    """A causal LM with standard module names and residual-stream accessors.

    ``model`` is a model directory or hub id (loaded with ``AutoModelForCausalLM``; other keyword arguments,
    e.g. ``device_map`` (default ``"auto"``) or ``dtype``, go to ``from_pretrained``) or a loaded
    ``PreTrainedModel`` (then pass ``tokenizer=`` unless its ``name_or_path`` has one).

    nnterp 1.x's arguments keep their meaning: ``trust_remote_code``; ``check_renaming`` (on a short prompt,
    every standard module reads a tensor of the right shape and every layer runs, else ``RenamingError``);
    ``allow_dispatch`` and nnsight's ``dispatch`` (accepted; the weights are always loaded);
    ``enable_attention_probs`` (eager attention, ``attention_probabilities`` checked with
    ``check_attn_probs_with_trace``); ``allow_multimodal`` (load models whose layers do not all run on text);
    ``rename_config`` (a ``RenameConfig``); ``rename`` (a ``RenameConfig``, or a dict ``{native name: alias}``
    merged over the defaults); ``tokenizer_kwargs``; ``remote`` (NDIF remote execution is not available: an
    error). ``check_layout`` warns when the inferred
    layout differs from the reviewed one under ``layouts/hf/``.
    """

    _batcher_class = AttentionMaskBatcher  # keeps the padded batch's attention mask for `last_position`

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
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
        tokenizer: Any = None,
        tokenizer_kwargs: dict | None = None,
        check_layout: bool = True,
        attn_implementation: str | None = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        refuse_remote(remote, "StandardizedTransformer")
        attn_implementation = eager_for_probabilities(enable_attention_probs, attn_implementation)
        config, hints, extra = split_rename(rename, rename_config, from_pretrained_kwargs)
        tokenizer_kwargs = dict(tokenizer_kwargs or {})
        from_pretrained_kwargs.pop("dispatch", None)  # nnsight's "load the weights now": they always are
        source = check_model_source(model, "StandardizedTransformer")
        if isinstance(source, str):
            tokenizer_source = source
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **tokenizer_kwargs)
            if attn_implementation is not None:
                from_pretrained_kwargs["attn_implementation"] = attn_implementation
            from_pretrained_kwargs.setdefault("device_map", "auto")
            model = _from_pretrained(source, trust_remote_code, from_pretrained_kwargs)
        else:
            if from_pretrained_kwargs:
                raise TypeError(
                    f"StandardizedTransformer got {sorted(from_pretrained_kwargs)} with an already loaded model; "
                    "those are loading arguments: pass them to from_pretrained, or pass the model's path instead."
                )
            tokenizer_source = getattr(model, "name_or_path", None) or None
            tokenizer = tokenizer or _tokenizer_of(model, tokenizer_kwargs)
            if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
                model.set_attn_implementation(attn_implementation)
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        hidden_size, probe = self._probe_hidden_size(model), self._probe_run(model)
        names = confirm_final_norm(model, resolve_names(model, config, hints, extra), hidden_size, probe)
        super().__init__(model, task="text-generation", tokenizer=tokenizer, rename=names.nnsight_rename())
        for key, value in tokenizer_kwargs.items():  # as nnsight's deprecated LanguageModel applied them
            setattr(self.tokenizer, key, value)
        layout = infer_layout(model, names, hidden_size, "hf", probe)
        self._init_standard_surface(names, config, Backend(), layout, tokenizer_source)
        self.attention_probabilities = AttentionProbabilities(self, config.attn_prob_source)
        self.attention_probabilities.find_sites()
        self._check_loaded(check_layout, check_renaming, allow_multimodal)
        self._pad_where_positions_stay()
        if check_renaming and enable_attention_probs:
            self.attention_probabilities.check_source(use_trace=check_attn_probs_with_trace)

    left_padding_shifts_positions: bool | None = None

    def _pad_where_positions_stay(self) -> None:
        """Models whose positions left padding shifts pad on the right (traces then refuse left padding)."""
        vocab = self._module.get_input_embeddings().weight.shape[0]
        tokens = [token % vocab for token in range(4, 4 + PROBE_TOKENS)]
        side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        shifts = left_padding_shifts_positions(self, tokens)
        self.left_padding_shifts_positions = shifts
        self.tokenizer.padding_side = "right" if shifts else side
        if shifts:
            logger.info("nnterp: %s pads on the right: left padding shifts its positions.", type(self._module).__name__)

    @staticmethod
    def _probe_hidden_size(model: PreTrainedModel) -> int:
        """The width of the stream between layers: the text config's hidden size (RemBERT's embeddings are
        narrower and projected up), else the input embeddings' width."""
        width = first_config_int(text_config(model.config), DEFAULT_CONFIG_KEYS["hidden_size"])
        return width if width is not None else model.get_input_embeddings().weight.shape[-1]

    @staticmethod
    def _probe_run(model: PreTrainedModel):
        device = next(model.parameters()).device
        tokens = torch.arange(4, 4 + PROBE_TOKENS, device=device)[None] % model.get_input_embeddings().weight.shape[0]
        return lambda: model(input_ids=tokens, use_cache=False)

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        """Rows an invoke contributes (nnsight's count), after checking that its input is a prompt."""
        check_prompts(inputs, self.tokenizer)
        return super()._batch_size(*inputs, **kwargs)

    def _batch(self, invokes: list, fn: Any) -> tuple:
        """nnsight's batching of a trace's invokes, with plain text prompts tokenized in one call."""
        if getattr(fn, "__name__", None) != "pipe":
            encoding = batch_text_prompts(self, invokes)
            if encoding is not None:
                return (), encoding
        return super()._batch(invokes, fn)

    @property
    def logits(self) -> torch.Tensor:
        """The model's output logits ``[batch, seq, vocab]`` (read inside a trace)."""
        return self._backend.run_value("model.logits", lambda: self.output.logits)

    @logits.setter
    def logits(self, value: torch.Tensor) -> None:
        def write(new: torch.Tensor) -> None:
            self.output.logits = new

        self._backend.run_write(write, value)

    def greedy_generation_kwargs(self, max_new_tokens: int) -> dict:
        """``generate`` arguments for greedy decoding on the raw logits, the one definition every nnterp tool
        uses (each step's token is the argmax of the model's logits): the checkpoint's sampling settings and logit
        processors (forced end of sequence, repetition penalty, minimum length, ...) are turned off, end of
        sequence still stops the run. They are keyword arguments, not a ``GenerationConfig``: transformers
        fills a config's unset fields from the checkpoint's, and keywords take precedence over both."""
        eos = self._module.generation_config.eos_token_id
        pad = self.tokenizer.pad_token_id
        return {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": eos if pad is None else pad,
                **RAW_GREEDY}

    def _run_extraction(self, plan, prompts, batch_size, max_new_tokens, generation_kwargs):
        from ..backends.hf.extraction import KeptMemory, run

        if getattr(self, "_extraction_memory", None) is None:
            self._extraction_memory = KeptMemory()
        return run(self, plan, prompts, batch_size or 32, max_new_tokens, generation_kwargs, self._extraction_memory)

    @property
    def step_token(self) -> torch.Tensor:
        """Inside a greedy generation step: the token it picks, ``[batch]``."""
        return self.logits[:, -1].argmax(-1)


def _tokenizer_of(model: PreTrainedModel, tokenizer_kwargs: dict) -> Any:
    """The tokenizer saved with a loaded model, or an error asking for one."""
    source = getattr(model, "name_or_path", None)
    try:
        if not source:
            raise OSError("the model has no name_or_path")
        return AutoTokenizer.from_pretrained(source, **tokenizer_kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Pass tokenizer=... together with an already loaded model (no tokenizer could be loaded from "
            f"its name_or_path {source!r}: {error})."
        ) from error


def _from_pretrained(source: str, trust_remote_code: bool, kwargs: dict) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained``, with an argument nobody takes named as such (transformers
    reports it from deep inside the model class)."""
    try:
        return AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except TypeError as error:
        unknown = [key for key in kwargs if f"unexpected keyword argument '{key}'" in str(error)]
        if not unknown:
            raise
        raise TypeError(
            f"StandardizedTransformer got {unknown[0]!r}, which is neither its own argument nor one that "
            f"from_pretrained or the model's config takes ({error})."
        ) from error
