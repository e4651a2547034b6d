"""Tests for the word-level tokenizer: splitting, chat template, round trip."""
import transformers

from aem_jax.models.tokenizer import PAD, IM_END, build_tokenizer, save_tokenizer

WORDS = ["open", "door", "3", "look", "key", "open"]
MESSAGES = [{"role": "system", "content": "look"}, {"role": "user", "content": "open door 3"}]


def test_splits_words_punctuation_and_newlines():
    tok = build_tokenizer(WORDS)
    assert len(tok("open door 3")["input_ids"]) == 3
    assert tok.tokenize("open door 3.\nlook\tzzz") == ["open", "door", "3", ".", "look", "<unk>"]
    assert tok.decode(tok("open  door\n3")["input_ids"]) == "open door 3"


def test_special_tokens_and_vocabulary():
    tok = build_tokenizer(WORDS)
    assert tok.pad_token == PAD and tok.pad_token_id == 0
    assert tok.eos_token == IM_END
    # Duplicates are dropped: every word has exactly one id.
    assert len(set(tok.convert_tokens_to_ids(["open", "door", "3", "look", "key"]))) == 5
    assert len(tok) == len(tok.get_vocab())


def test_chat_template_generation_prompt():
    tok = build_tokenizer(WORDS)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nlook<|im_end|>\n<|im_start|>user\nopen door 3<|im_end|>\n"
                    "<|im_start|>assistant\n")
    without = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=False)
    assert not without.endswith("assistant\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<|im_start|>", "system", "look", "<|im_end|>", "<|im_start|>", "user", "open", "door",
        "3", "<|im_end|>", "<|im_start|>", "assistant"]


def test_custom_template():
    tok = build_tokenizer(WORDS, chat_template="{% for m in messages %}{{ m['content'] }} {% endfor %}")
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == "look open door 3 "


def test_save_and_autotokenizer_round_trip(tmp_path):
    tok = build_tokenizer(WORDS)
    save_tokenizer(tok, tmp_path / "tok")
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.pad_token_id == tok.pad_token_id and loaded.eos_token_id == tok.eos_token_id
    for add in (True, False):
        a = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        b = loaded.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        assert a == b
    text = "open door 3 . look key"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_load_tokenizer_keeps_the_saved_tokenizer_beside_a_qwen_config(tmp_path):
    """transformers 5 maps a generic tokenizer.json to the config's model
    class (qwen2 -> Qwen2Tokenizer, a byte-level pre-tokenizer) and then
    mis-encodes this project's vocabularies; hf.load_tokenizer loads the
    file as saved."""
    import json

    from aem_jax.models import bpe, hf

    texts = ["open door 3 look", "look key open door"] * 20
    for tok in (build_tokenizer(WORDS), bpe.train_bpe_tokenizer(texts, vocab_size=300)):
        path = tmp_path / type(tok).__name__ / str(len(tok))
        save_tokenizer(tok, path)
        for model_type in ("qwen2", "qwen3", "llama"):
            (path / "config.json").write_text(json.dumps({"model_type": model_type}))
            loaded = hf.load_tokenizer(str(path))
            for text in ("open door 3", "look key\nopen"):
                assert loaded(text)["input_ids"] == tok(text)["input_ids"], (model_type, text)
            assert loaded.chat_template == tok.chat_template
            assert loaded.pad_token_id == tok.pad_token_id and loaded.eos_token == tok.eos_token
