"""Byte-level BPE tokenizers trained on a local corpus, for models trained from scratch.

The word-level tokenizer of ``tokenizer.py`` suits environments with a closed
vocabulary (the built-in game). Open-vocabulary tasks (TextWorld descriptions,
source code) need a tokenizer that can spell anything: a byte-level BPE
trained here, offline, on text the environment produces. It carries the same
special tokens and ChatML template, so it goes through the same loading path
(``save_pretrained`` -> ``AutoTokenizer.from_pretrained``) as a real one.
"""
from __future__ import annotations

from typing import Iterable

import tokenizers
import transformers
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as tk_models

from aem_jax.models.tokenizer import CHATML_TEMPLATE, EOT, IM_END, IM_START, PAD, SPECIAL_TOKENS, UNK


def train_bpe_tokenizer(
    texts: Iterable[str], *, vocab_size: int = 512, chat_template: str | None = None
) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer on ``texts``.

    Args:
      texts: the training corpus (e.g. observations of a few episodes).
      vocab_size: target vocabulary size (>= 256 + number of special tokens,
        so every byte stays encodable).
      chat_template: a Jinja chat template; defaults to ChatML.

    Returns:
      A `PreTrainedTokenizerFast` with ``pad_token="<pad>"`` (id 0) and
      ``eos_token="<|im_end|>"``, like ``build_tokenizer``'s.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} must be >= {minimum} (all bytes + special tokens)")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("texts is empty: a BPE tokenizer needs a non-empty corpus")
    core = tokenizers.Tokenizer(tk_models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
        additional_special_tokens=[IM_START, EOT], clean_up_tokenization_spaces=False,
        padding_side="left")
    tok.chat_template = CHATML_TEMPLATE if chat_template is None else chat_template
    return tok
