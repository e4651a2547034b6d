"""`python -m aem_jax.serve` on loopback and rollouts through `EndpointPolicy`.

One server (a tiny random checkpoint) is shared by the module. Rollouts
through it must record what the in-process sampler records for the same
prompts and seeds; a weight push must change what it samples; bad requests
get a 4xx naming the field.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import types
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aem_jax import models, serve
from aem_jax.rollout import ChatFormat, RolloutConfig, SamplerPolicy, collect
from aem_jax.rollout import remote
from aem_jax.trainer import defaults, validate
from aem_jax.trainer.rollouts import EpisodeKeys
from tests.rollout.helpers import treasure_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
TOK = treasure_tokenizer()
CHAT = ChatFormat(TOK)
CONFIG = RolloutConfig(num_tasks=2, group_size=2, max_turns=2, max_context_tokens=128,
                       max_action_tokens=6, seq_bucket=64)
MODEL_CONFIG = models.ModelConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_layers=2,
                                  num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    first, second = models.init_model(MODEL_CONFIG, seed=0), models.init_model(MODEL_CONFIG, seed=1)
    models.save_pretrained(first, TOK, root / "first")
    engine = serve.Engine.load(str(root / "first"), name="tiny", max_model_len=256)
    server = serve.Server(engine)  # 127.0.0.1, a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield types.SimpleNamespace(url=server.url, engine=engine, first=first, second=second, root=root)
    server.shutdown()
    server.server_close()


class Seeded:
    """The in-process twin of an endpoint: row i samples with the key the server
    derives from the seed `EndpointPolicy` sends for it."""

    def __init__(self, policy):
        self.policy = policy

    def generate(self, prompts, *, key, contexts=None):
        seeds = remote.row_seeds(key, len(prompts))
        keys = jnp.concatenate([serve.choice_keys(s, 1) for s in seeds])
        return self.policy.generate(prompts, key=keys, contexts=contexts)


def post(url, body, raw=None):
    """(status, decoded answer) of a POST, error statuses included."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("history", ["concatenated", "windowed"])
def test_rollouts_through_the_endpoint_record_the_in_process_samplers_logprobs(served, history):
    config = RolloutConfig(**{**CONFIG.__dict__, "history": history, "window": 1})
    remote_policy = EpisodeKeys(remote.EndpointPolicy.for_rollout(served.url, TOK, config))
    local_policy = EpisodeKeys(Seeded(SamplerPolicy.for_rollout(served.first, TOK, config)))
    batch, records, _ = collect("treasure", remote_policy, TOK, config, key=jax.random.key(7))
    want, _, _ = collect("treasure", local_policy, TOK, config, key=jax.random.key(7))
    assert batch.loss_mask.sum() > 0 and sum(r.turns for r in records) > 0
    np.testing.assert_array_equal(batch.tokens, want.tokens)
    np.testing.assert_array_equal(batch.loss_mask, want.loss_mask)
    np.testing.assert_allclose(batch.old_logp, want.old_logp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batch.old_entropy, want.old_entropy, atol=1e-5, rtol=0)
    assert np.abs(batch.old_logp).sum() > 0 and batch.old_entropy.sum() > 0


def test_a_weight_push_changes_what_the_endpoint_samples(served):
    # one request per prompt, as for vLLM (the rollout test sends lists of prompts with lists of seeds)
    policy = remote.EndpointPolicy(served.url, max_tokens=8, stop_token_ids=CHAT.stop_token_ids,
                                   rows_per_request=1)
    prompts = [CHAT.prompt_ids("open box 1"), CHAT.prompt_ids("read note")]
    key = jax.random.key(3)
    before = policy.generate(prompts, key=key)
    batched = remote.EndpointPolicy(served.url, max_tokens=8, stop_token_ids=CHAT.stop_token_ids)
    assert batched.rows_per_request == 64
    assert batched.generate(prompts, key=key) == before
    version = served.engine.weights_version
    try:
        answer = policy.push_weights(served.second, TOK, served.root / "push_second")
        assert answer["success"] and served.engine.weights_version == version + 1
        after = policy.generate(prompts, key=key)
        twin = Seeded(SamplerPolicy(served.second, policy_params(policy), TOK.pad_token_id)).generate(
            prompts, key=key)
    finally:
        policy.push_weights(served.first, TOK, served.root / "push_first")
    for a, b in zip(after, twin):  # the endpoint now plays the second model
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert any(not np.allclose(a.logprobs[:1], b.logprobs[:1], atol=1e-3) for a, b in zip(before, after))
    restored = policy.generate(prompts, key=key)
    assert [g.token_ids for g in restored] == [g.token_ids for g in before]


def policy_params(policy):
    from aem_jax.models import sampler

    return sampler.SamplingParams(max_new_tokens=policy.max_tokens, stop_token_ids=policy.stop_token_ids)


def test_completion_shape_models_and_health(served):
    text = "<|im_start|>"  # a special token: encoded alike by every tokenizer class
    body = {"model": "tiny", "prompt": [text, [5, 6, 7]], "n": 2, "max_tokens": 6, "seed": 11,
            "logprobs": 0}
    status, answer = post(served.url + "/v1/completions", body)
    assert status == 200, answer
    assert answer["object"] == "text_completion" and answer["model"] == "tiny"
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        lp, ids = c["logprobs"], c["token_ids"]
        assert 1 <= len(ids) <= 6 and lp["token_ids"] == ids
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["token_entropies"]) == len(ids)
        assert all(x <= 0 for x in lp["token_logprobs"]) and all(h >= 0 for h in lp["token_entropies"])
        assert c["finish_reason"] == ("stop" if ids[-1] == TOK.eos_token_id else "length")
    prompt_tokens = len(served.engine.tokenizer(text)["input_ids"]) + 3
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": sum(len(c["token_ids"])
                               for c in choices), "total_tokens": prompt_tokens + sum(
                               len(c["token_ids"]) for c in choices)}
    _, again = post(served.url + "/v1/completions", {**body, "return_tokens_as_token_ids": True})
    assert [c["token_ids"] for c in again["choices"]] == [c["token_ids"] for c in choices]
    assert again["choices"][0]["logprobs"]["tokens"] == [f"token_id:{t}" for t in choices[0]["token_ids"]]
    _, plain = post(served.url + "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 6, "best_of": 1,
                                                     "stream": False, "echo": False, "presence_penalty": 0.0})
    assert plain["choices"][0]["logprobs"] is None and len(plain["choices"][0]["token_ids"]) <= 6
    listing = remote.request_json(served.url + "/v1/models")
    assert listing["data"][0]["id"] == "tiny" and listing["data"][0]["max_model_len"] == 256
    assert remote.request_json(served.url + "/health") == {"status": "ok"}


@pytest.mark.parametrize("route, body, status, words", [
    ("/v1/completions", {"prompt": [5, 6], "temperature": -1}, 400, "temperature=-1"),
    ("/v1/completions", {"prompt": [5, 10 ** 6]}, 400, "prompt[1]=1000000"),
    ("/v1/completions", {"prompt": []}, 400, "prompt=[]"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt is missing"),
    ("/v1/completions", {"prompt": [5], "max_tokens": 0}, 400, "max_tokens=0"),
    ("/v1/completions", {"prompt": [5], "max_tokens": 300}, 400, "max_model_len=256"),
    ("/v1/completions", {"prompt": [5], "top_p": 0}, 400, "top_p=0"),
    ("/v1/completions", {"prompt": [5], "n": 0}, 400, "n=0"),
    ("/v1/completions", {"prompt": [5], "n": 2, "best_of": 3}, 400, "best_of=3"),
    ("/v1/completions", {"prompt": [5], "logprobs": 5}, 400, "logprobs=5"),
    ("/v1/completions", {"prompt": [5], "stop": ["\n"]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": [5], "stop_token_ids": [-1]}, 400, "stop_token_ids contains -1"),
    ("/v1/completions", {"prompt": [5], "seed": -3}, 400, "seed=-3"),
    ("/v1/completions", {"prompt": [[5], [6]], "seed": [1]}, 400, "seed has 1 entries for 2 prompts"),
    ("/v1/completions", {"prompt": [5], "temprature": 1}, 400, "unknown field 'temprature'"),
    ("/v1/completions", {"prompt": [5], "model": "gpt"}, 404, "serves 'tiny'"),
    ("/update_weights_from_disk", {"model_path": "/no/such/dir"}, 400, "model_path='/no/such/dir'"),
    ("/update_weights_from_disk", {}, 400, "model_path is missing"),
    ("/v1/chat/completions", {}, 404, "routes:"),
    ("/v1/models", {}, 405, "use GET"),
])
def test_bad_requests_get_a_4xx_naming_the_field(served, route, body, status, words):
    got, answer = post(served.url + route, body)
    assert got == status and words in answer["error"]["message"], answer
    assert answer["error"]["code"] == status


def test_invalid_json_and_other_architectures_are_refused(served, tmp_path):
    got, answer = post(served.url + "/v1/completions", None, raw=b"{not json")
    assert got == 400 and "not valid JSON" in answer["error"]["message"]
    other = tmp_path / "other"
    shutil.copytree(served.root / "first", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    got, answer = post(served.url + "/update_weights_from_disk", {"model_path": str(other)})
    assert got == 400 and "another architecture" in answer["error"]["message"]
    assert "max_position_embeddings: 64 != " in answer["error"]["message"]
    with pytest.raises(remote.EndpointError, match="HTTP 400: temperature=-1"):
        remote.request_json(served.url + "/v1/completions", {"prompt": [5], "temperature": -1})


def _vllm_choice(ids, logps, finish="stop"):
    return {"index": 0, "text": "", "finish_reason": finish,
            "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": logps,
                         "text_offset": [0] * len(ids), "top_logprobs": [None] * len(ids)}}


def test_a_vllm_shaped_choice_gives_surprisal_entropies_or_a_clear_error():
    choice = _vllm_choice([4, 9, 2], [-0.5, -1.25, -0.1])
    gen = remote.parse_choice(choice, stop_token_ids=[2], entropy="surprisal")
    assert gen.token_ids == [4, 9, 2] and gen.logprobs == [-0.5, -1.25, -0.1]
    assert gen.entropies == [0.5, 1.25, 0.1]
    with pytest.raises(remote.EndpointError, match="aem.signal='surprisal_per_token'"):
        remote.parse_choice(choice, stop_token_ids=[2], entropy="exact")
    with pytest.raises(remote.EndpointError, match="last token is not one of the stop ids"):
        remote.parse_choice(_vllm_choice([4, 9], [-0.5, -1.0]), stop_token_ids=[2], entropy="surprisal")
    with pytest.raises(remote.EndpointError, match="token_id:N"):
        remote.parse_choice({"logprobs": {"tokens": ["open"], "token_logprobs": [-1.0]}},
                            stop_token_ids=[2], entropy="surprisal")


def test_row_seeds_follow_each_rows_key_only():
    key = jax.random.key(5)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(4, dtype=jnp.uint32))
    assert remote.row_seeds(key, 4) == remote.row_seeds(keys, 4)
    assert remote.row_seeds(keys[2:], 2) == remote.row_seeds(key, 4)[2:]
    assert len(set(remote.row_seeds(key, 64))) == 64 and all(0 <= s < 2 ** 31 for s in remote.row_seeds(key, 64))
    a, b = serve.choice_keys(2 ** 40 + 1, 1), serve.choice_keys(1, 1)
    assert not np.array_equal(jax.random.key_data(a), jax.random.key_data(b))


@pytest.mark.parametrize("key, value, words", [
    ("endpoint", "127.0.0.1:8000", "http(s) URL"),
    ("endpoint", "ftp://host", "http(s) URL"),
    ("endpoint", "http://host:99999", "valid port"),
    ("reload_route", "update", "starting with '/'"),
])
def test_config_names_a_bad_endpoint(key, value, words):
    c = defaults.base()
    c.rollout[key] = value
    with pytest.raises(validate.ConfigError, match=f"config.rollout.{key}=.*{words}".replace("(", r"\(")
                       .replace(")", r"\)")):
        validate.check(c)
    c.rollout.endpoint, c.rollout.reload_route = "http://127.0.0.1:8000/v1", "/update_weights_from_disk"
    validate.check(c)


@pytest.mark.slow  # a server process and the trainer's first compiles: ~35 s on 2 cores
def test_the_trainer_plays_a_step_through_the_served_cli(tmp_path):
    """``python -m aem_jax.serve`` in its own process; the smoke config's rollout
    phase pushes its weights there and records the policy's own log-probs."""
    from aem_jax import sharding
    from aem_jax.trainer import algorithms, loop, rollouts, setup

    config = setup.load_config(str(REPO / "configs/default.py") + ":smoke")
    mesh = sharding.make_mesh(dict(config.mesh))
    ctx = loop.build_context(config, mesh)
    policy = ctx.policy(ctx.init_params)
    models.save_pretrained(models.init_model(policy.config, seed=5), ctx.tokenizer, tmp_path / "other")
    process = subprocess.Popen([sys.executable, "-m", "aem_jax.serve", f"--model={tmp_path / 'other'}",
                                "--port=0", "--served-model-name=policy"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = process.stdout.readline()
            assert line or process.poll() is None, "the server exited before serving"
        url = re.search(r"on (http://\S+)", line).group(1)
        assert url.startswith("http://127.0.0.1:")
        config.rollout.endpoint, config.rollout.weights_dir = url, str(tmp_path / "pushed")
        validate.check(config)
        with sharding.use_mesh(mesh):
            batch, records, _ = rollouts.collect_batch(ctx, algorithms.get(config.algorithm), ctx.init_params, 0)
            rollouts.sampler(ctx, ctx.init_params)  # a second push replaces the first directory
        listing = remote.request_json(url + "/v1/models")["data"][0]
        assert listing["id"] == "policy" and listing["weights_version"] == 2
        assert sorted(os.listdir(tmp_path / "pushed")) == ["push-1"]
    finally:
        process.terminate()
        process.wait(30)
        process.stdout.close()
    assert batch.loss_mask.sum() > 0 and len(records) == config.rollout.num_tasks * config.rollout.group_size
    logp_all = jax.nn.log_softmax(np.asarray(models.logits(policy, batch.tokens, batch.attention_mask),
                                             np.float32), axis=-1)[:, :-1]
    logp = np.take_along_axis(logp_all, np.asarray(batch.tokens)[:, 1:, None], -1)[..., 0]
    ent = -np.sum(np.exp(logp_all) * logp_all, -1)
    mask = np.asarray(batch.loss_mask)[:, 1:] == 1
    np.testing.assert_allclose(np.asarray(batch.old_logp)[:, 1:][mask], logp[mask], atol=1e-4)
    np.testing.assert_allclose(np.asarray(batch.old_entropy)[:, 1:][mask], ent[mask], atol=1e-4)
