"""Small word-level tokenizers for models trained from scratch.

A tiny model trained on a text game does not need a 150k-entry BPE
vocabulary: a word-level vocabulary of the game's words keeps the embedding
and unembedding small and every action a handful of tokens. The tokenizer is
built with the `tokenizers` library and wrapped in a
`transformers.PreTrainedTokenizerFast`, so it is saved in Hugging Face format
and reloaded through `transformers.AutoTokenizer` -- the same loading path as
a real checkpoint's tokenizer.

Tokenization: special tokens are matched first; the rest of the text is split
on whitespace (spaces, tabs and newlines are all separators and produce no
token) and every ASCII punctuation character is isolated, so
``"open door 3."`` -> ``["open", "door", "3", "."]``. Words not in the
vocabulary become ``<unk>``. Decoding joins tokens with single spaces.

Vocabulary order (ids): the special tokens ``SPECIAL_TOKENS`` (``<pad>`` = 0),
the chat role names ``ROLES``, the ASCII punctuation characters, then the
given words in first-seen order (duplicates dropped).
"""
from __future__ import annotations

import os
import string
from typing import Iterable

import tokenizers
import transformers
from tokenizers import models as tk_models
from tokenizers import pre_tokenizers

PAD, UNK, IM_START, IM_END, EOT = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, IM_START, IM_END, EOT)
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")

# ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message, and an open
# assistant header when `add_generation_prompt` is set.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _vocabulary(words: Iterable[str]) -> dict[str, int]:
    """Token -> id for the special tokens, roles, punctuation and `words`."""
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *ROLES, *string.punctuation):
        vocab.setdefault(token, len(vocab))
    for word in words:
        if not isinstance(word, str) or not word or any(c.isspace() for c in word):
            raise ValueError(
                f"words: {word!r} is not a non-empty string without whitespace; "
                "each entry must be one whitespace-free word")
        vocab.setdefault(word, len(vocab))
    return vocab


def build_tokenizer(
    words: Iterable[str], *, chat_template: str | None = None
) -> transformers.PreTrainedTokenizerFast:
    """Builds a word-level tokenizer with a ChatML chat template.

    Args:
      words: the vocabulary words (whitespace-free strings; order fixes ids,
        duplicates and words equal to special/role/punctuation tokens are
        dropped). Words containing punctuation can never be produced by the
        pre-tokenizer, which isolates punctuation characters.
      chat_template: a Jinja chat template; defaults to ChatML
        (``CHATML_TEMPLATE``).

    Returns:
      A `PreTrainedTokenizerFast` with ``pad_token = "<pad>"`` (id 0),
      ``unk_token = "<unk>"`` and ``eos_token = "<|im_end|>"``.
    """
    vocab = _vocabulary(words)
    core = tokenizers.Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")])
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=IM_END,
        additional_special_tokens=[IM_START, EOT],
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    tok.chat_template = CHATML_TEMPLATE if chat_template is None else chat_template
    return tok


def save_tokenizer(tok: transformers.PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """Saves `tok` (with its chat template) in Hugging Face format under `path`."""
    os.makedirs(path, exist_ok=True)
    tok.save_pretrained(str(path))
