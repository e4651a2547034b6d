"""The corpus-trained byte-level BPE tokenizer used by scratch models on open-vocabulary tasks."""
import pytest
import transformers

from aem_jax.models.bpe import train_bpe_tokenizer

CORPUS = ["You are in a kitchen. There is a fridge here.", "> open fridge", "def add(a, b):\n    return a + b\n"] * 5


def test_round_trip_and_chat_template(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, vocab_size=300)
    text = "def unseen_name(x):\n    return x * 2  # ünïcode"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    chat = tok.apply_chat_template([{"role": "user", "content": "open fridge"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\nopen fridge<|im_end|>\n<|im_start|>assistant\n"
    tok.save_pretrained(tmp_path)
    again = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(text, add_special_tokens=False) == ids
    assert again.pad_token_id == 0 and again.eos_token == "<|im_end|>"


def test_bad_input():
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 261"):
        train_bpe_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="texts is empty"):
        train_bpe_tokenizer([], vocab_size=300)
