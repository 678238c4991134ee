"""A small byte-level BPE tokenizer trained locally, so tests never touch a model hub."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerFast

_CORPUS = (
    "The capital of France is Paris. The capital of Germany is Berlin. "
    "The capital of Italy is Rome. The Eiffel Tower is in Paris. "
    "Hello world, this is a tiny model used to test interpretability tools. "
    "A cat sat on the mat; the dog ran in the park. One two three four five six. "
    "Le chat est noir. Der Hund ist braun. El perro es grande. "
)

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# A plain chat template, so chat endpoints and chat-template tools run on tiny models too.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@lru_cache(maxsize=None)
def _trained(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 20, trainer)
    return tokenizer


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A fast tokenizer with ``vocab_size`` entries (256 byte tokens + merges + 4 specials)."""
    if vocab_size < 264:
        raise ValueError(f"vocab_size must be at least 264 (byte alphabet + specials), got {vocab_size}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_trained(vocab_size), **SPECIAL_TOKENS)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(directory: str | Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
