"""Patchscopes: a source prompt's hidden state written into a target prompt, then read off as tokens."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import nnsight
import torch
from tqdm.auto import tqdm as auto_tqdm

from ..core.progress import with_progress
from ..core.tokens import token_id_list, until_eos
from ..core.tracing import as_prompts, token_positions, trace_prompts, with_tokens_at
from .activations import (
    get_attention,
    get_layer_output,
    get_num_layers,
    get_token_activations,
    is_standardized,
    last_token_probs,
    layer_index,
    set_layer_output,
)
from .steering import LOOP_CUT_SHORT


@dataclass
class TargetPrompt:
    """A prompt to patch and the token (``index_to_patch``, counted in its own tokens) that receives the
    source's hidden state."""

    prompt: str
    index_to_patch: int


def repeat_prompt(words=None, rel=" ", sep="\n", placeholder="?", index_to_patch=-1) -> TargetPrompt:
    """The identity prompt of the patchscopes paper: ``"king king\\n1135 1135\\nhello hello\\n?"`` (``rel``
    between a word and its copy, ``sep`` between pairs), patched at ``index_to_patch`` (the placeholder)."""
    words = ["king", "1135", "hello"] if words is None else words
    prompt = sep.join(word + rel + word for word in words) + sep + placeholder
    return TargetPrompt(prompt, index_to_patch)


def it_repeat_prompt(
    tokenizer,
    words=None,
    rel=" ",
    sep="\n",
    placeholder="?",
    complete_prompt=True,
    add_user_instr=True,
    use_system_prompt=True,
) -> TargetPrompt:
    """:func:`repeat_prompt` in the tokenizer's chat template, for instruction-tuned models; the
    assistant's turn repeats the pattern (``complete_prompt``) or is left open. Patched at its last token."""
    pattern = repeat_prompt(words, rel, sep, placeholder).prompt
    chat = []
    if add_user_instr:
        if use_system_prompt:
            chat.append({"role": "system", "content": "You are a helpful assistant."})
        chat += [
            {"role": "user", "content": "Continue each sentence I send with its next word, and answer with that word only."},
            {"role": "assistant", "content": "Understood."},
            {"role": "user", "content": pattern},
        ]
    elif use_system_prompt:
        chat += [
            {"role": "system", "content": "Answer with the next word of the user's sentence, and nothing else."},
            {"role": "user", "content": pattern},
        ]
    else:
        chat.append({"role": "user", "content": f"What is the next word of this sentence? Answer with it only: {pattern}"})
    chat.append({"role": "assistant", "content": pattern if complete_prompt else ""})
    text = tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    return TargetPrompt(text, -1)


@dataclass
class TargetPromptBatch:
    """Several target prompts, each with its own index to patch (``index_to_patch``: ``[batch]``)."""

    prompts: list[str]
    index_to_patch: torch.Tensor

    @classmethod
    def from_target_prompts(cls, prompts_: list[TargetPrompt]) -> "TargetPromptBatch":
        return cls([p.prompt for p in prompts_], torch.tensor([int(p.index_to_patch) for p in prompts_]))

    @classmethod
    def from_target_prompt(cls, prompt: TargetPrompt, batch_size: int) -> "TargetPromptBatch":
        return cls([prompt.prompt] * batch_size, torch.tensor([int(prompt.index_to_patch)] * batch_size))

    @classmethod
    def from_prompts(cls, prompts: str | list[str], index_to_patch: int | list[int] | torch.Tensor) -> "TargetPromptBatch":
        prompts = as_prompts(prompts)
        if isinstance(index_to_patch, int):
            index_to_patch = torch.tensor([index_to_patch] * len(prompts))
        elif isinstance(index_to_patch, list):
            index_to_patch = torch.tensor(index_to_patch)
        elif not isinstance(index_to_patch, torch.Tensor):
            raise ValueError(f"index_to_patch must be an int, a list of ints or a tensor, got {type(index_to_patch)}")
        if len(index_to_patch) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(index_to_patch)} indices to patch.")
        return cls(prompts, index_to_patch)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx: int) -> TargetPrompt:
        return TargetPrompt(self.prompts[idx], int(self.index_to_patch[idx]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @staticmethod
    def auto(target_prompt: str | TargetPrompt | list[TargetPrompt] | "TargetPromptBatch", batch_size: int) -> "TargetPromptBatch":
        """A batch of ``batch_size`` from one target prompt (a string is patched at its last token), or the
        given prompts as a batch."""
        if isinstance(target_prompt, str):
            target_prompt = TargetPrompt(target_prompt, -1)
        if isinstance(target_prompt, TargetPrompt):
            return TargetPromptBatch.from_target_prompt(target_prompt, batch_size)
        if isinstance(target_prompt, list):
            return TargetPromptBatch.from_target_prompts(target_prompt)
        if isinstance(target_prompt, TargetPromptBatch):
            return target_prompt
        raise ValueError(
            "patch_prompts must be a str, a TargetPrompt, a list of TargetPrompt or a TargetPromptBatch, "
            f"got {type(target_prompt)}"
        )


def _layer_list(nn_model: Any, layers: int | Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(get_num_layers(nn_model)))
    return [layers] if isinstance(layers, int) else list(layers)


@torch.no_grad()
def patchscope_lens(
    nn_model: Any,
    source_prompts: list[str] | str | None = None,
    target_patch_prompts: TargetPromptBatch | list[TargetPrompt] | TargetPrompt | None = None,
    layers: int | list[int] | None = None,
    latents: torch.Tensor | None = None,
    remote: bool = False,
    *,
    tqdm: Callable | None = auto_tqdm,
) -> torch.Tensor:
    """For each layer: each target prompt's hidden state at its ``index_to_patch`` is replaced by its source's
    hidden state at the source's last token (or by ``latents``: ``[layers, sources, hidden]``, one row per
    entry of ``layers`` or per model layer), and the target's next-token probabilities are read. Returns ``[sources, layers, vocab]``
    on CPU. One trace per layer (``tqdm=None`` hides the bar); the default target is :func:`repeat_prompt`.
    """
    target_patch_prompts = repeat_prompt() if target_patch_prompts is None else target_patch_prompts
    layers = _layer_list(nn_model, layers)
    if latents is not None:
        if source_prompts is not None:
            raise ValueError("You cannot provide both source_prompts and latents")
        num_layers = get_num_layers(nn_model)
        if latents.ndim != 3 or latents.shape[0] not in (len(layers), num_layers):
            raise ValueError(f"latents must be [layers ({len(layers)}, or all {num_layers}), sources, hidden], "
                             f"got shape {tuple(latents.shape)}.")
        if latents.shape[0] != len(layers):  # one row per model layer: keep the requested ones
            latents = latents[[layer_index(nn_model, layer) for layer in layers]]
        num_sources = latents.shape[1]
    elif source_prompts is None:
        raise ValueError("Either source_prompts or latents must be provided")
    else:
        source_prompts = as_prompts(source_prompts)
        num_sources = len(source_prompts)
    targets = TargetPromptBatch.auto(target_patch_prompts, num_sources)
    if len(targets) != num_sources:
        raise ValueError(f"Number of sources ({num_sources}) does not match number of patch prompts ({len(targets)})")
    if latents is None:
        latents = get_token_activations(nn_model, source_prompts, layers=layers, remote=remote)
    probs = []
    for i, layer in enumerate(with_progress(tqdm, layers, "Patchscope layers")):
        probs.append(_patched_next_token_probs(nn_model, targets, layer, latents[i], remote))
    return torch.stack(probs, dim=1)


def _patched_next_token_probs(nn_model: Any, targets: TargetPromptBatch, layer: int, vectors: torch.Tensor, remote: bool) -> torch.Tensor:
    """Next-token probabilities of each target with ``vectors[row]`` written into the output of ``layer`` at
    its index to patch: ``[targets, vocab]``."""
    indices = targets.index_to_patch

    def compute(model, rows):
        where = token_positions(model, indices[rows])
        last = token_positions(model, -1)
        stream = get_layer_output(model, layer)
        set_layer_output(model, layer, with_tokens_at(model, stream, where, vectors[rows]))
        return last_token_probs(model, last).cpu()

    return trace_prompts(nn_model, targets.prompts, compute, remote)


def _eos_ids(nn_model: Any) -> set[int]:
    ids: set[int] = set()
    for config in (getattr(nn_model._module, "generation_config", None), nn_model._module.config):
        ids |= set(token_id_list(getattr(config, "eos_token_id", None)))
    return ids


@torch.no_grad()
def patchscope_generate(
    nn_model: Any,
    prompts: list[str] | str,
    target_patch_prompt: TargetPrompt,
    max_length: int = 50,
    layers=None,
    remote: bool = False,
    max_batch_size: int = 32,
    *,
    tqdm: Callable | None = auto_tqdm,
) -> dict[int, torch.Tensor]:
    """For each layer: the target prompt's hidden state at its ``index_to_patch`` is replaced by each source
    prompt's last-token hidden state, then the model generates greedily up to ``max_length`` new tokens.

    Returns ``{layer: token ids [num_prompts, prompt tokens + generated]}``, as ``generate`` gives them
    (a row that ended early is padded with the pad token). Rows (layer, prompt) run ``max_batch_size`` per
    generation, one invoke each.
    """
    if remote:
        raise NotImplementedError("patchscope_generate runs locally; remote=True is not supported.")
    if not is_standardized(nn_model):
        raise TypeError("patchscope_generate needs a StandardizedTransformer or StandardizedVLLM (greedy decoding "
                        f"the same way on both backends), got {type(nn_model).__name__}.")
    prompts = as_prompts(prompts)
    layers = [layer_index(nn_model, layer, "layers") for layer in _layer_list(nn_model, layers)]
    hiddens = get_token_activations(nn_model, prompts, layers=layers)
    jobs = [(i, layer, p) for i, layer in enumerate(layers) for p in range(len(prompts))]
    generated: dict[tuple[int, int], list[int]] = {}
    chunks = [jobs[start:start + max_batch_size] for start in range(0, len(jobs), max_batch_size)]
    for chunk in with_progress(tqdm, chunks, "Patchscope generations"):
        for job, tokens in zip(chunk, _generate_patched(nn_model, target_patch_prompt, chunk, hiddens, max_length)):
            generated[job[1], job[2]] = tokens
    prompt_ids = nn_model.tokenizer(target_patch_prompt.prompt, return_tensors="pt").input_ids[0].tolist()
    eos = _eos_ids(nn_model)
    pad = nn_model.tokenizer.pad_token_id
    result = {}
    for layer in layers:
        rows = [until_eos(generated[layer, p], eos) for p in range(len(prompts))]
        width = max(len(row) for row in rows)
        result[layer] = torch.tensor([prompt_ids + row + [pad] * (width - len(row)) for row in rows])
    return result


def _generate_patched(nn_model: Any, target: TargetPrompt, jobs: list, hiddens: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """One greedy generation per job ``(layer position, layer, source)``, all in one batched run."""
    index = int(target.index_to_patch)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=LOOP_CUT_SHORT)
        with nn_model.generate(**nn_model.greedy_generation_kwargs(max_new_tokens)) as tracer:
            slots = nnsight.save([None] * len(jobs))
            for row, (i, layer, source) in enumerate(jobs):
                vector = hiddens[i, source]
                with tracer.invoke(target.prompt):
                    slots[row] = []
                    where = token_positions(nn_model, index)
                    for step in tracer.iter[:]:
                        if step == 0:  # the prompt's forward pass
                            stream = get_layer_output(nn_model, layer)
                            set_layer_output(nn_model, layer, with_tokens_at(nn_model, stream, where, vector))
                        slots[row].append(int(nn_model.step_token.reshape(-1)[0]))
    return [list(tokens) for tokens in slots]


def _attention_input(nn_model: Any, layer: int):
    return nn_model.attentions_input[layer] if is_standardized(nn_model) else get_attention(nn_model, layer).input


def _set_attention_input(nn_model: Any, layer: int, value: torch.Tensor) -> None:
    if is_standardized(nn_model):
        nn_model.attentions_input[layer] = value
    else:
        get_attention(nn_model, layer).input = value


@torch.no_grad()
def patch_object_attn_lens(
    nn_model: Any,
    source_prompts: list[str] | str,
    target_prompts: list[str] | str,
    attn_idx_patch: int,
    num_patches: int = 5,
    *,
    tqdm: Callable | None = auto_tqdm,
) -> torch.Tensor:
    """For each layer ``l``: in layers ``l .. l + num_patches - 1``, the attention block's input at token
    ``attn_idx_patch`` of each target prompt is replaced by its source prompt's (at the source's last
    token), and the target's next-token probabilities are read. One source for all targets, or one per
    target. Returns ``[num_target_prompts, num_layers, vocab]`` on CPU, one trace per layer."""
    source_prompts, target_prompts = as_prompts(source_prompts), as_prompts(target_prompts)
    if len(source_prompts) not in (1, len(target_prompts)):
        raise ValueError(f"{len(source_prompts)} source prompts for {len(target_prompts)} targets: give one source, or one per target.")
    num_layers = get_num_layers(nn_model)
    sources = get_token_activations(nn_model, source_prompts, get_activations=_attention_input)
    sources = sources.expand(num_layers, len(target_prompts), sources.shape[-1])
    probs = []
    for layer in with_progress(tqdm, range(num_layers), "Attention patch layers"):
        patched = list(range(layer, min(num_layers, layer + num_patches)))

        def compute(model, rows, patched=patched, vectors=sources[patched]):
            where = token_positions(model, attn_idx_patch)
            last = token_positions(model, -1)
            for next_layer, layer_vectors in zip(patched, vectors):
                current = _attention_input(model, next_layer)
                _set_attention_input(model, next_layer, with_tokens_at(model, current, where, layer_vectors[rows]))
            return last_token_probs(model, last).cpu()

        probs.append(trace_prompts(nn_model, target_prompts, compute))
    return torch.stack(probs, dim=1)
