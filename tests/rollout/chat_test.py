"""Chat segments equal the template's own rendering, for several templates."""
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

import pytest

from aem_jax.rollout import ChatFormat, StepPool, StepTimeout
from tests.rollout.helpers import byte_level_tokenizer, treasure_tokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# Qwen 2.5 style: a default system message when none is given.
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["You are in a kitchen. There is a fridge.", "open fridge", "take apple from fridge",
          "go east", "You see a red-hot king-size bed!"] * 20


def _llama_tokenizer():
    core = tokenizers.Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|eot_id|>", additional_special_tokens=specials[1:3])
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def _qwen_tokenizer():
    tok = byte_level_tokenizer(CORPUS)
    tok.chat_template = QWEN_TEMPLATE
    return tok


@pytest.mark.parametrize("make, eot", [
    (treasure_tokenizer, "<|im_end|>"), (lambda: byte_level_tokenizer(CORPUS), "<|im_end|>"),
    (_llama_tokenizer, "<|eot_id|>"), (_qwen_tokenizer, "<|im_end|>"),
])
@pytest.mark.parametrize("system", [None, "Play well."])
def test_segments_concatenate_to_the_rendered_chat(make, eot, system):
    tok = make()
    chat = ChatFormat(tok, system)
    assert tok.convert_ids_to_tokens(chat.end_of_turn_id) == eot
    observations = ["You are in a kitchen. There is a fridge.", "You see a red-hot bed!", "ok"]
    actions = ["open fridge", "go east"]
    ids = chat.prompt_ids(observations[0])
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [
        {"role": "user", "content": observations[0]}]
    for action, obs in zip(actions, observations[1:]):
        ids += chat.action_ids(action) + chat.env_ids(obs)
        messages += [{"role": "assistant", "content": action}, {"role": "user", "content": obs}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    if make is not treasure_tokenizer:  # byte-level: decoding is exact
        assert chat.decode_action(chat.action_ids("take apple from fridge")) == \
            "take apple from fridge"
    # An action cut at the token limit is closed by a context end-of-turn token.
    assert chat.env_ids("ok", closed=False)[0] == chat.end_of_turn_id


def test_tokenizer_without_template_is_refused():
    tok = treasure_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        ChatFormat(tok)


def test_step_pool_abandons_stuck_tasks_and_keeps_its_workers():
    import threading
    import time
    pool = StepPool(2)
    gate = threading.Event()
    try:
        start = time.monotonic()
        out = pool.run([lambda: gate.wait(20), lambda: 1 / 0, lambda: "ok", lambda: gate.wait(20),
                        lambda: 7], timeout_s=0.3)
        assert time.monotonic() - start < 5
        assert isinstance(out[0].error, StepTimeout) and isinstance(out[3].error, StepTimeout)
        assert isinstance(out[1].error, ZeroDivisionError)
        assert out[2].value == "ok" and out[4].value == 7
        # Two workers were lost to the stuck tasks; replacements run new work.
        assert [o.value for o in pool.run([lambda: 1, lambda: 2, lambda: 3], timeout_s=1)] == \
            [1, 2, 3]
    finally:
        gate.set()
    with pytest.raises(ValueError, match="num_threads=0"):
        StepPool(0)
