"""Shared pieces of the rollout tests: tokenizers, scripted players, faulty envs."""
import threading

import numpy as np
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from aem_jax.envs.treasure import TreasureHunt, vocabulary
from aem_jax.models import build_tokenizer
from aem_jax.models.tokenizer import CHATML_TEMPLATE
from aem_jax.rollout import ChatFormat, ScriptedPolicy, message_words


def treasure_tokenizer():
    return build_tokenizer(vocabulary() + message_words())


def byte_level_tokenizer(corpus):
    """A small byte-level BPE tokenizer with ChatML, trained on `corpus` (exact decoding)."""
    core = tokenizers.Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"], clean_up_tokenization_spaces=False)
    tok.chat_template = CHATML_TEMPLATE
    return tok


def mixed_player(seed=0, invalid_every=5):
    """Mostly optimal, sometimes random or malformed; fixed by (episode, turn)."""
    def act(ctx):
        rng = np.random.default_rng([seed, ctx.episode, ctx.turn])
        u = rng.random()
        if ctx.turn > 0 and (ctx.episode + ctx.turn) % invalid_every == 0:
            return ["", "find gold", "open box"][int(rng.integers(3))]
        if u < 0.7:
            return ctx.env.optimal_action()
        return str(rng.choice(ctx.env.valid_actions()))
    return act


def scripted(act, tok):
    return ScriptedPolicy(act, tok, ChatFormat(tok).end_of_turn_id)


class Faulty:
    """A treasure game that raises or hangs on chosen seeds at a chosen turn."""

    release = threading.Event()  # set at the end of a test so hung threads finish

    def __init__(self, *, raise_seed=None, hang_seed=None, at_turn=1):
        self.inner = TreasureHunt()
        self.raise_seed, self.hang_seed, self.at_turn = raise_seed, hang_seed, at_turn
        self.seed, self.turn = None, 0

    def reset(self, *, seed):
        self.seed, self.turn = seed, 0
        if self.hang_seed == seed and self.at_turn == 0:
            self.release.wait(30)
        return self.inner.reset(seed=seed)

    def step(self, action):
        self.turn += 1
        if self.raise_seed == self.seed and self.turn == self.at_turn:
            raise RuntimeError("environment crashed")
        if self.hang_seed == self.seed and self.turn == self.at_turn:
            self.release.wait(30)
        return self.inner.step(action)

    def optimal_action(self):
        return self.inner.optimal_action()
