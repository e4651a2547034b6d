"""ChatFormat on the real chat templates of Qwen3, Qwen2.5 and Llama 3.1.

The templates in tests/rollout/templates/ are those of the models'
tokenizer_config.json (Qwen/Qwen3-8B, Qwen/Qwen2.5-7B-Instruct,
meta-llama/Llama-3.1-8B-Instruct), attached to small byte-level BPE
tokenizers that carry the models' special tokens. Episodes are played with
"sampled" tokens that are deliberately not the canonical tokenization of
their text (one token per character), so any re-tokenization would show.
"""
import pathlib
import re

import jax
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from aem_jax.envs.treasure import TreasureHunt
from aem_jax.rollout import ChatFormat, Generation, RolloutConfig, collect

TEMPLATES = pathlib.Path(__file__).parent / "templates"
CORPUS = ["You are in a kitchen. There is a fridge.", "open fridge", "go east", "I should look "
          "around first, then open the fridge.", "Observation: nothing happens."] * 20
SYSTEM = "You are an agent. Answer with one command."


def _tokenizer(template, specials, *, added=(), **tokens):
    core = tokenizers.Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=500, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, clean_up_tokenization_spaces=False,
        additional_special_tokens=[s for s in specials if s not in tokens.values()], **tokens)
    # Qwen's <think> and <tool_call> tags are added tokens that are not special.
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in added])
    tok.chat_template = (TEMPLATES / template).read_text()
    return tok


def qwen3_tokenizer():
    return _tokenizer("qwen3.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      added=["<think>", "</think>", "<tool_call>", "</tool_call>"],
                      eos_token="<|im_end|>", pad_token="<|endoftext|>")


def qwen25_tokenizer():
    return _tokenizer("qwen2_5.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                      added=["<tool_call>", "</tool_call>"],
                      eos_token="<|im_end|>", pad_token="<|endoftext|>")


def llama31_tokenizer():
    return _tokenizer("llama3_1.jinja", [
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


TOKENIZERS = {"qwen3": qwen3_tokenizer(), "qwen2.5": qwen25_tokenizer(),
              "llama3.1": llama31_tokenizer()}


def _sampled(tok, chat, text, *, stop=True):
    """Ids a sampler could have produced for `text`: one token per character, tags whole."""
    ids = []
    tags = [t for t in ("<think>", "</think>") if t in tok.get_vocab()]
    for part in _pieces(text, tags):
        if part in tags:
            ids.append(tok.convert_tokens_to_ids(part))
        else:
            for ch in part:
                ids += tok(ch, add_special_tokens=False)["input_ids"]
    return ids + ([chat.end_of_turn_id] if stop else [])


def _pieces(text, tags):
    out, rest = [], text
    while rest:
        hits = [(rest.index(t), t) for t in tags if t in rest]
        if not hits:
            return out + [rest]
        i, tag = min(hits)
        out += [rest[:i], tag] if i else [tag]
        rest = rest[i + len(tag):]
    return out


def _play(chat, task, actions, observations, *, closed=None):
    """Segments of an episode: prompt, then (sampled action, env glue) per turn."""
    closed = closed or [True] * len(actions)
    tok = chat.tokenizer
    prompt = chat.prompt_ids(task)
    turns = []
    for k, action in enumerate(actions):
        sampled = _sampled(tok, chat, action, stop=closed[k])
        glue = chat.env_ids(observations[k], closed=closed[k]) if k < len(observations) else []
        turns.append((sampled, glue))
    return prompt, turns


ACTIONS_REASONING = ["<think>\nThe fridge is closed.\n</think>\n\nopen fridge",
                     "<think>\nNothing here; I should look around first.\n</think>\n\ngo east",
                     "<think>\n\n</think>\n\nlook"]
ACTIONS_PLAIN = ["open fridge", "go east", "look"]
OBSERVATIONS = ["You open the fridge. It is empty.", "You are in a hall.  ", "Observation: done."]
TASK = "You are in a kitchen. There is a fridge."


def _messages(system, task, actions, observations, role="user"):
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": task})
    for action, obs in zip(actions, observations):
        msgs += [{"role": "assistant", "content": action}, {"role": role, "content": obs}]
    return msgs


def _answer(action):
    """The assistant content a reasoning template keeps (Qwen3: text after </think>)."""
    return action.split("</think>")[-1].lstrip("\n")


@pytest.mark.parametrize("name", list(TOKENIZERS))
@pytest.mark.parametrize("system", [None, SYSTEM])
@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("actions", [ACTIONS_REASONING, ACTIONS_PLAIN], ids=["reasoning", "plain"])
def test_each_segment_is_the_template_rendering_and_actions_stay_as_sampled(
        name, system, thinking, actions):
    tok = TOKENIZERS[name]
    if thinking is not None and name != "qwen3":
        with pytest.raises(ValueError, match="never reads enable_thinking"):
            ChatFormat(tok, system, enable_thinking=thinking)
        return
    extra = {} if thinking is None else {"enable_thinking": thinking}
    chat = ChatFormat(tok, system, enable_thinking=thinking)
    prompt, turns = _play(chat, TASK, actions, OBSERVATIONS)
    render = lambda msgs: tok.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=True, **extra)
    # The first prompt is the template's own rendering, tokenized as a whole.
    first = render(_messages(system, TASK, [], []))
    assert prompt == tok(first, add_special_tokens=False)["input_ids"]
    row = list(prompt)
    for k, (sampled, glue) in enumerate(turns):
        start = len(row)
        row += sampled + glue
        # The sampled ids sit in the row untouched (and are not what tokenizing gives).
        assert row[start:start + len(sampled)] == sampled
        assert sampled != chat.action_ids(actions[k])
        assert chat.decode_action(sampled) == (_answer(actions[k]) if name == "qwen3"
                                               else actions[k])
        if k + 1 == len(turns):
            continue
        # The glue decodes to what the template renders after this assistant message
        # in the conversation the model saw (its earlier turns as sampled).
        rendered = render(_messages(system, TASK, actions[:k + 1], OBSERVATIONS[:k + 1]))
        content = _answer(actions[k]) if name == "qwen3" else actions[k]
        after = rendered[rendered.rindex(content) + len(content):]
        assert tok.decode([chat.end_of_turn_id] + glue) == after
        assert glue == tok(after, add_special_tokens=False)["input_ids"][1:]
    assert chat.stop_token_ids == (chat.end_of_turn_id,)
    eot = {"qwen3": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3.1": "<|eot_id|>"}[name]
    assert tok.convert_ids_to_tokens(chat.end_of_turn_id) == eot


@pytest.mark.parametrize("name, glue_text", [
    ("qwen3", "<|im_end|>\n<|im_start|>user\n<tool_response>\nO1\n</tool_response><|im_end|>\n"
              "<|im_start|>assistant\n"),
    ("qwen2.5", "<|im_end|>\n<|im_start|>user\n<tool_response>\nO1\n</tool_response>"
                "<|im_end|>\n<|im_start|>assistant\n"),
    # Llama 3.1's template JSON-encodes tool results (a string is "iterable" in Jinja).
    ("llama3.1", '<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n"O1"<|eot_id|>'
                 "<|start_header_id|>assistant<|end_header_id|>\n\n"),
])
def test_observations_as_tool_results(name, glue_text):
    tok = TOKENIZERS[name]
    chat = ChatFormat(tok, SYSTEM, observation_role="tool")
    assert tok.decode([chat.end_of_turn_id] + chat.env_ids("O1")) == glue_text
    actions = ACTIONS_REASONING if name == "qwen3" else ACTIONS_PLAIN
    _, turns = _play(chat, TASK, actions, OBSERVATIONS)
    for k, (_, glue) in enumerate(turns[:-1]):
        rendered = tok.apply_chat_template(
            _messages(SYSTEM, TASK, actions[:k + 1], OBSERVATIONS[:k + 1], role="tool"),
            tokenize=False, add_generation_prompt=True)
        content = _answer(actions[k])
        assert tok.decode([chat.end_of_turn_id] + glue) == \
            rendered[rendered.rindex(content) + len(content):]
    with pytest.raises(ValueError, match="observation_role='system'"):
        ChatFormat(tok, observation_role="system")


def _decoded_row(chat, prompt, turns):
    ids = list(prompt) + [i for sampled, glue in turns for i in sampled + glue]
    return chat.tokenizer.decode(ids)


def test_qwen3_rows_by_hand_with_and_without_thinking():
    tok = TOKENIZERS["qwen3"]
    actions = ["<think>\nclosed\n</think>\n\nopen fridge", "go east", "look"]
    for thinking, header in [(None, "<|im_start|>assistant\n"),
                             (True, "<|im_start|>assistant\n"),
                             (False, "<|im_start|>assistant\n<think>\n\n</think>\n\n")]:
        chat = ChatFormat(tok, "S.", enable_thinking=thinking)
        prompt, turns = _play(chat, "T0", actions, ["O1", "O2"])
        assert _decoded_row(chat, prompt, turns) == (
            "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nT0<|im_end|>\n" + header
            + "<think>\nclosed\n</think>\n\nopen fridge<|im_end|>\n"
            + "<|im_start|>user\nO1<|im_end|>\n" + header + "go east<|im_end|>\n"
            + "<|im_start|>user\nO2<|im_end|>\n" + header + "look<|im_end|>")
    # Qwen3's own rendering of the same conversation differs: it strips the earlier
    # reasoning, and the old "delta" method refused the template for that reason.
    plain = tok.apply_chat_template(
        [{"role": "user", "content": "T0"}, {"role": "assistant", "content": actions[0]},
         {"role": "user", "content": "O1"}], tokenize=False)
    assert "closed" not in plain
    with pytest.raises(ValueError, match="renders earlier messages differently"):
        _Legacy(tok, None)


def test_llama31_rows_by_hand_with_the_knowledge_date_preamble():
    tok = TOKENIZERS["llama3.1"]
    chat = ChatFormat(tok)
    prompt, turns = _play(chat, "T0", [" open fridge", "go east"], ["O1 "])
    assert _decoded_row(chat, prompt, turns) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nT0<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n open fridge<|eot_id|>"
        # The template trims the observation; the sampled leading space stays.
        "<|start_header_id|>user<|end_header_id|>\n\nO1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\ngo east<|eot_id|>")
    dated = ChatFormat(tok, template_kwargs={"date_string": "01 Jan 2030"})
    assert "Today Date: 01 Jan 2030" in tok.decode(dated.prompt_ids("T0"))


class _Legacy:
    """The "delta" method ChatFormat used before: the reference for prefix-stable templates."""

    _U, _A = "<<user-probe>>", "<<agent-probe>>"

    def __init__(self, tok, system):
        self.tok, self.head = tok, [] if system is None else [{"role": "system", "content": system}]
        base = self._render([{"role": "user", "content": self._U},
                             {"role": "assistant", "content": self._A}], False)
        full = self._render([{"role": "user", "content": self._U},
                             {"role": "assistant", "content": self._A},
                             {"role": "user", "content": self._U}], True)
        if not full.startswith(base):
            raise ValueError("chat template renders earlier messages differently")
        tail = base[base.rindex(self._A) + len(self._A):]
        self.prefix, _, self.suffix = full[len(base):].partition(self._U)
        eot = tok.convert_ids_to_tokens(self._enc(tail)[0])
        self.tail = tail[tail.index(eot) + len(eot):]

    def _render(self, msgs, gen):
        return self.tok.apply_chat_template(self.head + msgs, tokenize=False,
                                            add_generation_prompt=gen)

    def _enc(self, text):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, task):
        return self._enc(self._render([{"role": "user", "content": task}], True))

    def env_ids(self, obs):
        return self._enc(self.tail + self.prefix + obs + self.suffix)

    def user_ids(self, obs):
        return self._enc(self.prefix + obs + self.suffix)


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1"])
@pytest.mark.parametrize("system", [None, SYSTEM])
def test_prefix_stable_templates_give_the_same_segments_as_before(name, system):
    tok = TOKENIZERS[name]
    chat, legacy = ChatFormat(tok, system), _Legacy(tok, system)
    for text in [TASK, "Observation: nothing happens.", "x", "two\nlines"]:
        assert chat.prompt_ids(text) == legacy.prompt_ids(text)
        assert chat.env_ids(text) == legacy.env_ids(text)
        assert chat.user_ids(text) == legacy.user_ids(text)
    # And the whole chat is the template's rendering of the conversation.
    prompt, turns = _play(chat, TASK, ACTIONS_PLAIN, OBSERVATIONS[:2])
    ids = list(prompt)
    for k, (_, glue) in enumerate(turns):
        ids += chat.action_ids(ACTIONS_PLAIN[k]) + glue
    rendered = tok.apply_chat_template(
        _messages(system, TASK, ACTIONS_PLAIN, OBSERVATIONS[:2])
        + [{"role": "assistant", "content": ACTIONS_PLAIN[2]}], tokenize=False)
    expected = tok(rendered, add_special_tokens=False)["input_ids"]
    if name == "qwen2.5":  # ChatML closes the last message with "\n" as well
        expected = expected[:-1]
    assert ids == expected


def test_qwen25_default_system_prompt_and_windowed_pieces():
    tok = TOKENIZERS["qwen2.5"]
    chat = ChatFormat(tok)
    assert tok.decode(chat.prompt_ids("T0")) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nT0<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(chat.task_ids("T0") + chat.user_ids("O3")) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
        "assistant.<|im_end|>\n<|im_start|>user\nT0<|im_end|>\n"
        "<|im_start|>user\nO3<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_reasoning_is_split_from_the_action_and_cut_actions_are_closed():
    tok = TOKENIZERS["qwen3"]
    chat = ChatFormat(tok)
    assert chat.reasoning_tags == ("<think>", "</think>")
    ids = _sampled(tok, chat, "<think>\nplan: open it\n</think>\n\nopen fridge")
    assert chat.decode_action(ids) == "open fridge"
    assert chat.decode_reasoning(ids) == "plan: open it"
    assert chat.assistant_message(ids) == {"role": "assistant", "content": "open fridge",
                                           "reasoning_content": "plan: open it"}
    # Cut inside the reasoning (no end-of-turn): no action; the glue closes the turn.
    cut = _sampled(tok, chat, "<think>\nplan: open", stop=False)
    assert chat.decode_action(cut) == "" and chat.decode_reasoning(cut) == "plan: open"
    glue = chat.env_ids("O1", closed=False)
    assert glue[0] == chat.end_of_turn_id
    assert tok.decode(cut + glue) == (
        "<think>\nplan: open<|im_end|>\n<|im_start|>user\nO1<|im_end|>\n<|im_start|>assistant\n")
    # No reasoning block: the whole text is the action.
    plain = _sampled(tok, chat, "go east")
    assert chat.decode_action(plain) == "go east" and chat.decode_reasoning(plain) is None
    assert chat.assistant_message(plain) == {"role": "assistant", "content": "go east"}
    # Templates without reasoning keep the whole text.
    other = ChatFormat(TOKENIZERS["qwen2.5"])
    assert other.reasoning_tags is None
    text = "<think>x</think>go"
    assert other.decode_action(other.tokenizer(text)["input_ids"]) == text


def test_qwen3_tools_in_the_system_message_leave_the_glue_alone():
    tok = TOKENIZERS["qwen3"]
    schema = {"type": "function", "function": {"name": "bash", "parameters": {
        "type": "object", "properties": {"command": {"type": "string"}}}}}
    chat = ChatFormat(tok, SYSTEM, template_kwargs={"tools": [schema]})
    prompt = tok.decode(chat.prompt_ids("T0"))
    assert prompt.startswith("<|im_start|>system\n" + SYSTEM + "\n\n# Tools") and '"bash"' in prompt
    assert chat.env_ids("O1") == ChatFormat(tok, SYSTEM).env_ids("O1")


def test_bad_options_are_refused():
    tok = TOKENIZERS["qwen3"]
    with pytest.raises(ValueError, match="enable_thinking='no'"):
        ChatFormat(tok, enable_thinking="no")
    broken = qwen25_tokenizer()
    broken.chat_template = ("{% for m in messages %}{{ m['role'] }}:"
                            "{% if m['role'] == 'assistant' %}[hidden]{% else %}{{ m['content'] }}"
                            "{% endif %}\n{% endfor %}")
    with pytest.raises(ValueError, match="does not render an assistant message's content"):
        ChatFormat(broken)
    # The last assistant message closed by one token, earlier ones by another.
    broken.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if loop.last and m['role'] == 'assistant' %}<|endoftext|>{% else %}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ValueError, match=re.escape("closes an assistant message with '<|endoftext|>'")):
        ChatFormat(broken)


class _Thinker:
    """A policy that reasons, then answers with the treasure game's best move.

    Its ids are one token per character (not what tokenizing the text gives);
    it records every prompt it is shown.
    """

    def __init__(self, chat):
        self.chat, self.prompts, self.sampled = chat, {}, {}

    def generate(self, prompts, *, key, contexts=None):
        del key
        out = []
        for prompt, ctx in zip(prompts, contexts):
            text = f"<think>\nturn {ctx.turn}: best move\n</think>\n\n{ctx.env.optimal_action()}"
            ids = _sampled(self.chat.tokenizer, self.chat, text)
            self.prompts[ctx.episode, ctx.turn] = list(prompt)
            self.sampled[ctx.episode, ctx.turn] = ids
            out.append(Generation(ids, [-0.5] * len(ids), [0.1] * len(ids)))
        return out


@pytest.mark.parametrize("thinking, role", [(True, "user"), (False, "tool")])
def test_collect_with_a_qwen3_template_trains_on_what_was_sampled_and_shown(thinking, role):
    tok = TOKENIZERS["qwen3"]
    config = RolloutConfig(num_tasks=2, group_size=2, max_turns=6, max_context_tokens=2048,
                           max_action_tokens=200, seq_bucket=64, system_prompt=SYSTEM,
                           enable_thinking=thinking, observation_role=role)
    policy = _Thinker(ChatFormat(tok, SYSTEM, enable_thinking=thinking, observation_role=role))
    batch, records, metrics = collect(lambda: TreasureHunt(num_clues=1), policy, tok, config,
                                      key=jax.random.key(0), task_seeds=[3, 4])
    assert metrics["success_rate"] == 1.0 and metrics["invalid_action_rate"] == 0.0
    header = "<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n")
    for rec in records:
        b, row = rec.episode, batch.tokens[rec.episode].tolist()
        assert rec.turns >= 2
        for k in range(rec.turns):
            shown, sampled = policy.prompts[b, k], policy.sampled[b, k]
            assert tok.decode(shown).endswith(header)
            if k > 0:
                assert ("</tool_response><|im_end|>\n" + header in tok.decode(shown)) == \
                    (role == "tool")
            # The row is what the model was shown at turn k, then what it sampled ...
            assert row[:len(shown) + len(sampled)] == shown + sampled
            # ... and only the sampled tokens are trained on, with their log-probs.
            span = slice(len(shown), len(shown) + len(sampled))
            assert batch.loss_mask[b, span].tolist() == [1.0] * len(sampled)
            assert np.all(batch.turn_ids[b, span] == k)
            np.testing.assert_allclose(batch.old_logp[b, span], -0.5)
        n_agent = sum(len(policy.sampled[b, k]) for k in range(rec.turns))
        assert batch.loss_mask[b].sum() == n_agent
        # The transcript keeps the answer and the reasoning apart.
        said = [m for m in rec.transcript if m["role"] == "assistant"]
        assert said[0]["reasoning_content"] == "turn 0: best move"
        assert "<think>" not in said[0]["content"] and said[0]["content"]
