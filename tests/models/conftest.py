"""Session fixtures for the model tests: a word-level tokenizer and tiny checkpoints."""
import pytest

from models_testlib import WORDS, make_checkpoints
from aem_jax.models.tokenizer import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(WORDS)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer):
    return make_checkpoints(tmp_path_factory.mktemp("checkpoints"), tokenizer)
