"""Token segments of a chat, built from the tokenizer's own chat template.

The rollout engine never re-tokenizes a whole conversation: the agent's
tokens must stay exactly the ones it sampled (re-tokenizing text can merge or
split them differently). Instead a conversation is the concatenation of

  prompt_ids(task)       [system] + user(task) + assistant header
  (windowed prompts: task_ids(task) + user_ids(obs) start a window at obs)
  action ids             what the policy generated, ending with end-of-turn
  env_ids(observation)   rest of the closed assistant message + user(obs) +
                         assistant header

and the pieces are derived from the chat template by rendering a fixed
two-message conversation and the same conversation plus one user message,
and tokenizing the difference (the "delta" method; it works for any template
that renders earlier messages independently of later ones, e.g. ChatML,
Qwen 2.5/3 and Llama 3).
"""
from __future__ import annotations

from typing import Any

_USER, _AGENT = "<<user-probe>>", "<<agent-probe>>"


def _render(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt)


class ChatFormat:
    """Token segments for one tokenizer and (optional) system prompt.

    Attributes:
      end_of_turn_id: the special token that closes an assistant message in
        the template (``<|im_end|>`` for ChatML); policies stop on it.
    """

    def __init__(self, tokenizer: Any, system_prompt: str | None = None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no chat_template; the rollout needs one "
                "(set tokenizer.chat_template or build it with aem_jax.models.build_tokenizer)")
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        head = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        self._head = head
        base = _render(tokenizer, head + [{"role": "user", "content": _USER},
                                          {"role": "assistant", "content": _AGENT}],
                       generation_prompt=False)
        full = _render(tokenizer, head + [{"role": "user", "content": _USER},
                                          {"role": "assistant", "content": _AGENT},
                                          {"role": "user", "content": _USER}],
                       generation_prompt=True)
        if not full.startswith(base):
            raise ValueError("chat template renders earlier messages differently once a user "
                             "message follows; the rollout cannot build turns incrementally")
        tail = base[base.rindex(_AGENT) + len(_AGENT):]
        before, _, after = full[len(base):].partition(_USER)
        self._obs_prefix, self._obs_suffix = before, after
        special = set(tokenizer.all_special_ids)
        tail_ids = self._encode(tail)
        if tail_ids and tail_ids[0] in special:
            self.end_of_turn_id = tail_ids[0]
            # Text after the end-of-turn token (e.g. ChatML's newline).
            self._tail = tail[tail.index(tokenizer.convert_ids_to_tokens(tail_ids[0]))
                              + len(tokenizer.convert_ids_to_tokens(tail_ids[0])):]
        else:
            if tokenizer.eos_token_id is None:
                raise ValueError("tokenizer has neither an end-of-turn token in its chat "
                                 "template nor an eos_token; cannot tell where actions end")
            self.end_of_turn_id = int(tokenizer.eos_token_id)
            self._tail = tail
        self.stop_token_ids = tuple(sorted({self.end_of_turn_id} | (
            {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set())))

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, task: str) -> list[int]:
        """[system] + user(task) + assistant header: the first turn's prompt."""
        text = _render(self.tokenizer, self._head + [{"role": "user", "content": task}],
                       generation_prompt=True)
        return self._encode(text)

    def task_ids(self, task: str) -> list[int]:
        """[system] + user(task), without the assistant header (windowed prompts)."""
        text = _render(self.tokenizer, self._head + [{"role": "user", "content": task}],
                       generation_prompt=False)
        return self._encode(text)

    def user_ids(self, observation: str) -> list[int]:
        """user(observation) + assistant header, to follow a closed message."""
        return self._encode(self._obs_prefix + observation + self._obs_suffix)

    def env_ids(self, observation: str, *, closed: bool = True) -> list[int]:
        """Tokens after an action: end of the assistant message, user(obs), header.

        Args:
          observation: the environment's answer.
          closed: the action ended with the end-of-turn token; if False (it
            was cut at the token limit) the end-of-turn token is added here,
            as a context token, so the chat stays well formed.
        """
        ids = [] if closed else [self.end_of_turn_id]
        return ids + self._encode(self._tail + self._obs_prefix + observation + self._obs_suffix)

    def action_ids(self, action: str) -> list[int]:
        """An action as a policy that stopped by itself would have produced it."""
        return self._encode(action) + [self.end_of_turn_id]

    def decode_action(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)
