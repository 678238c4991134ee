"""StandardizedTransformer: the standardized surface on a HuggingFace model through nnsight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from nnsight import LanguageModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..attention import AttentionProbabilities
from ..layout import confirm_final_norm, infer_model_layout
from ..rename import RenameConfig, resolve_names
from .base import HIDDEN_SIZE_KEYS, Backend, StandardizedMixin, _config_value

PROBE_TOKENS = 6


class StandardizedTransformer(LanguageModel, StandardizedMixin):
    """A causal LM with standard module names and residual-stream accessors.

    ``model`` is a path or hub-style name (loaded with ``AutoModelForCausalLM``) or a loaded
    ``PreTrainedModel``; extra keyword arguments go to ``from_pretrained``. ``rename`` overrides
    where standard modules live. ``check_layout`` warns when the inferred layout differs from the
    reviewed one under ``layouts/hf/``.
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        rename: RenameConfig | None = None,
        tokenizer: Any = None,
        check_layout: bool = True,
        attn_implementation: str | None = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        if isinstance(model, (str, Path)):
            if attn_implementation is not None:
                from_pretrained_kwargs["attn_implementation"] = attn_implementation
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(str(model))
            model = AutoModelForCausalLM.from_pretrained(str(model), **from_pretrained_kwargs)
        elif tokenizer is None:
            raise ValueError("Pass tokenizer=... together with an already loaded model.")
        model.eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        hidden_size, probe = self._probe_hidden_size(model), self._probe_run(model)
        names = confirm_final_norm(model, resolve_names(model, rename), hidden_size, probe)
        super().__init__(model, tokenizer=tokenizer, rename=names.nnsight_rename())
        self.names = names
        self._backend = Backend()
        self.layout = infer_model_layout(model, names, hidden_size, "hf", type(model).__name__, probe)
        self._init_standard_surface()
        self.attention_probabilities = AttentionProbabilities(self)
        self._check_against_snapshot(check_layout)

    @property
    def _text_config(self):
        config = self._module.config
        return config.get_text_config() if hasattr(config, "get_text_config") else config

    @staticmethod
    def _probe_hidden_size(model: PreTrainedModel) -> int:
        """The width of the stream between layers: the text config's hidden size (RemBERT's embeddings are
        narrower and projected up), else the input embeddings' width."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        try:
            return _config_value(config, HIDDEN_SIZE_KEYS)
        except AttributeError:
            return model.get_input_embeddings().weight.shape[-1]

    @staticmethod
    def _probe_run(model: PreTrainedModel):
        device = next(model.parameters()).device
        tokens = torch.arange(4, 4 + PROBE_TOKENS, device=device)[None] % model.get_input_embeddings().weight.shape[0]
        return lambda: model(input_ids=tokens, use_cache=False)

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
        """``generate`` arguments for greedy decoding on the raw logits: the checkpoint's sampling settings and
        logit processors (repetition penalty, ...) are replaced, end of sequence still stops the run."""
        from transformers import GenerationConfig

        eos = self._module.generation_config.eos_token_id
        pad = self.tokenizer.pad_token_id
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos if pad is None else pad
        )
        return {"generation_config": config}

    @property
    def step_token(self) -> torch.Tensor:
        """Inside a greedy generation step: the token it picks, ``[batch]``."""
        return self.logits[:, -1].argmax(-1)
