"""Token segments of a chat, built from the tokenizer's own chat template.

The rollout engine never re-tokenizes a whole conversation: the agent's
tokens must stay exactly the ones it sampled (re-tokenizing text can merge or
split them differently). Instead a conversation is the concatenation of

  prompt_ids(task)       [system] + user(task) + assistant header
  (windowed prompts: task_ids(task) + user_ids(obs) start a window at obs)
  action ids             what the policy generated, ending with end-of-turn
  env_ids(observation)   rest of the closed assistant message + user(obs) +
                         assistant header

so the row the learner trains on is, token for token, what the model was
shown at each turn followed by what it sampled.

The "glue" after an action (``env_ids``) is cut out of the template's own
rendering of a probe conversation ``[system] user(probe) assistant(probe)
user(observation)`` plus the generation prompt: the text after the probe
assistant content. Only that message's end and what follows it are taken, so
templates that render earlier assistant turns differently once a later user
message exists (Qwen3 strips ``<think>`` reasoning from them and drops the
empty think block it gives the last assistant turn) are supported: that
instability changes the header and content of the earlier turn, never the
text after it. The observation is rendered by the template itself (Llama 3
trims message contents), so every glue segment is exactly what the template
renders after an assistant message for that observation, generation prompt
included (with ``enable_thinking=False`` Qwen3's prompt ends with an empty
``<think>\\n\\n</think>\\n\\n`` block).

Reasoning: earlier turns' sampled tokens are kept verbatim, reasoning
included, in the concatenated history; the model is shown what it sampled
(the only choice under which each turn's prompt is a prefix of the row, i.e.
one forward pass scores every turn). Qwen3's own template would strip that
reasoning when re-rendering the conversation; here it is not re-rendered.
`decode_action` returns the answer after the reasoning block (what the
environment acts on) and `decode_reasoning` the reasoning.
"""
from __future__ import annotations

from typing import Any

_USER, _AGENT, _OBS = "<<user-probe>>", "<<agent-probe>>", "<<observation-probe>>"
_THINK = ("<think>", "</think>")
OBSERVATION_ROLES = ("user", "tool")


def _template_text(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    return " ".join(template.values()) if isinstance(template, dict) else str(template)


class ChatFormat:
    """Token segments for one tokenizer, (optional) system prompt and template options.

    Args:
      tokenizer: a Hugging Face tokenizer with a ``chat_template``.
      system_prompt: optional system message before the task.
      enable_thinking: passed to the template (Qwen3: False puts an empty
        think block in every generation prompt, so the model answers without
        reasoning); None passes nothing (the template's default). Refused for
        templates that do not read it.
      template_kwargs: further keyword arguments for ``apply_chat_template``
        (e.g. ``tools`` JSON schemas, Llama's ``date_string``).
      observation_role: the role observations after the task are rendered
        with: "user", or "tool" (tool results as the template shows them:
        Qwen's ``<tool_response>`` block, Llama 3.1's ``ipython`` header).

    Attributes:
      end_of_turn_id: the special token that closes an assistant message in
        the template (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3);
        policies stop on it.
      stop_token_ids: end_of_turn_id and the tokenizer's eos token.
      reasoning_tags: ``("<think>", "</think>")`` when the template handles
        reasoning blocks, else None.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None, *,
                 enable_thinking: bool | None = None,
                 template_kwargs: dict[str, Any] | None = None,
                 observation_role: str = "user"):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no chat_template; the rollout needs one "
                "(set tokenizer.chat_template or build it with aem_jax.models.build_tokenizer)")
        if observation_role not in OBSERVATION_ROLES:
            raise ValueError(f"observation_role={observation_role!r}; allowed: {OBSERVATION_ROLES}")
        template = _template_text(tokenizer)
        kwargs = dict(template_kwargs or {})
        if enable_thinking is not None:
            if not isinstance(enable_thinking, bool):
                raise ValueError(f"enable_thinking={enable_thinking!r}; allowed: True, False, None")
            if "enable_thinking" not in template:
                raise ValueError(
                    f"enable_thinking={enable_thinking} but the chat template never reads "
                    "enable_thinking (only templates such as Qwen3's do); leave it None")
            kwargs["enable_thinking"] = enable_thinking
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.enable_thinking = enable_thinking
        self.template_kwargs = kwargs
        self.observation_role = observation_role
        self._head = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        self.reasoning_tags = _THINK if _THINK[1] in template else None
        base = self._render([{"role": "user", "content": _USER},
                             {"role": "assistant", "content": _AGENT}], generation_prompt=False)
        if _AGENT not in base:
            raise ValueError(f"the chat template does not render an assistant message's content "
                             f"verbatim ({_AGENT!r} is missing from {base!r}); cannot tell where "
                             "sampled tokens go")
        # The end of a closed assistant message, as rendered when it is the last message.
        tail = base[base.index(_AGENT) + len(_AGENT):]
        self._closing = tail
        self._glue(_OBS)  # a template whose glue cannot be cut out fails here, early
        special = set(tokenizer.all_special_ids)
        tail_ids = self._encode(tail)
        if tail_ids and tail_ids[0] in special:
            self.end_of_turn_id = tail_ids[0]
            eot_text = tokenizer.convert_ids_to_tokens(tail_ids[0])
            # Text after the end-of-turn token (e.g. ChatML's newline).
            self._tail = tail[tail.index(eot_text) + len(eot_text):]
        else:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has neither an end-of-turn token in its chat "
                                 "template nor an eos_token; cannot tell where actions end")
            self.end_of_turn_id = int(tokenizer.eos_token_id)
            self._tail = tail
        self._reasoning_ids = self._tag_ids()
        self.stop_token_ids = tuple(sorted({self.end_of_turn_id} | (
            {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set())))

    # -- rendering -----------------------------------------------------------------------

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            self._head + messages, tokenize=False, add_generation_prompt=generation_prompt,
            **self.template_kwargs)

    def _glue(self, observation: str) -> str:
        """Template text after an assistant message's content when user(observation) follows.

        It is the message's closing (``self._closing``), then the user message
        and the generation prompt.
        """
        full = self._render([{"role": "user", "content": _USER},
                             {"role": "assistant", "content": _AGENT},
                             {"role": self.observation_role, "content": observation}],
                            generation_prompt=True)
        glue = full[full.index(_AGENT) + len(_AGENT):]
        if not glue.startswith(self._closing):
            raise ValueError(
                f"the chat template closes an assistant message with {self._closing!r} when it is "
                f"the last message but with {glue[:len(self._closing) + 16]!r}... when a user "
                "message follows; the rollout cannot append turns to sampled tokens")
        return glue[len(self._closing):]

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- segments ------------------------------------------------------------------------

    def prompt_ids(self, task: str) -> list[int]:
        """[system] + user(task) + assistant header: the first turn's prompt."""
        return self._encode(self._render([{"role": "user", "content": task}],
                                         generation_prompt=True))

    def task_ids(self, task: str) -> list[int]:
        """[system] + user(task), without the assistant header (windowed prompts)."""
        return self._encode(self._render([{"role": "user", "content": task}],
                                         generation_prompt=False))

    def user_ids(self, observation: str) -> list[int]:
        """user(observation) (or its tool message) + assistant header, after a closed message."""
        return self._encode(self._glue(observation))

    def env_ids(self, observation: str, *, closed: bool = True) -> list[int]:
        """Tokens after an action: end of the assistant message, user(obs), header.

        Args:
          observation: the environment's answer.
          closed: the action ended with the end-of-turn token; if False (it
            was cut at the token limit) the end-of-turn token is added here,
            as a context token, so the chat stays well formed.
        """
        ids = [] if closed else [self.end_of_turn_id]
        return ids + self._encode(self._tail + self._glue(observation))

    def action_ids(self, action: str) -> list[int]:
        """An action as a policy that stopped by itself would have produced it."""
        return self._encode(action) + [self.end_of_turn_id]

    # -- decoding ------------------------------------------------------------------------

    def _tag_ids(self) -> tuple[int, int] | None:
        """Ids of the reasoning tags when each is one token of the vocabulary."""
        if self.reasoning_tags is None:
            return None
        ids = [self._encode(tag) for tag in self.reasoning_tags]
        return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None

    def _split(self, ids: list[int]) -> tuple[list[int] | None, list[int]]:
        """(reasoning ids or None, answer ids) of generated ids.

        The answer follows the last ``</think>``, as in Qwen3's template; a
        reasoning block that was opened and never closed (cut at the token
        limit) leaves no answer.
        """
        ids = [int(t) for t in ids]
        if self._reasoning_ids is None:
            return None, ids
        open_id, close_id = self._reasoning_ids
        if close_id in ids:
            k = len(ids) - ids[::-1].index(close_id)
            return ids[:k], ids[k:]
        if open_id in ids:
            return ids, []
        return None, ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _split_text(self, text: str) -> tuple[str | None, str]:
        """Text-level `_split` for tokenizers whose tags are not single tokens."""
        open_tag, close_tag = self.reasoning_tags
        if close_tag in text:
            head, _, answer = text.rpartition(close_tag)
            return head, answer
        return (text, "") if open_tag in text else (None, text)

    def decode_action(self, ids: list[int]) -> str:
        """The answer of generated ids (after any reasoning block), special tokens dropped."""
        if self.reasoning_tags is None:
            return self._decode(ids)
        if self._reasoning_ids is None:
            return self._split_text(self._decode(ids))[1].lstrip("\n")
        return self._decode(self._split(ids)[1]).lstrip("\n")

    def decode_reasoning(self, ids: list[int]) -> str | None:
        """The reasoning of generated ids (tags and surrounding newlines removed), or None."""
        if self.reasoning_tags is None:
            return None
        if self._reasoning_ids is None:
            reasoning = self._split_text(self._decode(ids))[0]
        else:
            part = self._split(ids)[0]
            reasoning = None if part is None else self._decode(part)
        if reasoning is None:
            return None
        open_tag, close_tag = self.reasoning_tags
        return reasoning.replace(close_tag, "").split(open_tag)[-1].strip("\n")

    def assistant_message(self, ids: list[int]) -> dict[str, str]:
        """A transcript message for generated ids: content, and reasoning_content if any."""
        message = {"role": "assistant", "content": self.decode_action(ids)}
        reasoning = self.decode_reasoning(ids)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return message
