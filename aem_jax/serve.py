"""`python -m aem_jax.serve --model=DIR`: the sampler behind an OpenAI-compatible HTTP API.

Routes (JSON in and out; bound to 127.0.0.1 unless ``--host`` says otherwise,
and there is no authentication):

  POST /v1/completions            OpenAI completions, with vLLM's extensions
                                  (token-id prompts, ``stop_token_ids``,
                                  ``top_k``, ``ignore_eos``,
                                  ``return_tokens_as_token_ids``)
  GET  /v1/models                 the served model
  GET  /health                    200 once the model is loaded
  POST /update_weights_from_disk  {"model_path": DIR}: load new weights (SGLang's name)

Every choice carries the generated ids as ``choices[i].token_ids`` (what
vLLM returns with ``return_token_ids``), and with ``logprobs`` set (0 is the
only value: top alternatives are not computed), ``choices[i].logprobs`` holds
``tokens``, ``token_logprobs``, ``text_offset``, ``top_logprobs`` (null per
token) and two additions: ``token_ids`` and ``token_entropies``.
``token_logprobs[t]`` and ``token_entropies[t]`` are the sampler's

  logp_t = log pi'(y_t | y_<t),   H_t = -sum_v pi'(v | y_<t) log pi'(v | y_<t)

with pi' the distribution the token was drawn from (after temperature, top-k
and top-p: vLLM's ``--logprobs-mode processed_logprobs``); greedy requests
(temperature 0) report the temperature-1 distribution's, as the sampler does.

Randomness: choice i of a request with seed s samples with the key
``choice_keys(s, count)[i]`` (``fold_in(key(s), i)``). An extension: ``seed``
may also be a list with one seed per prompt; choice j of prompt p then uses
``choice_keys(seed[p], n)[j]``, so a request of P prompts with seeds s_p
samples exactly what P one-prompt requests with seeds s_p would (what
`aem_jax.rollout.remote.EndpointPolicy` sends this server: fewer, larger
requests). Either way a choice's sample does not depend on the requests that
share its batch: concurrent requests with the same sampling settings are run
as one batch (rows of the sampler draw from their own keys), so a request's
result does not depend on the traffic around it.
"""
from __future__ import annotations

import argparse
import dataclasses
import http.server
import json
import math
import os
import secrets
import sys
import threading
import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aem_jax.models import hf, sampler

DEFAULT_HOST = "127.0.0.1"
MAX_N = 256                 # choices per request
MAX_BODY_BYTES = 64 << 20   # a request body larger than this is refused (413)
RELOAD_ROUTE = "/update_weights_from_disk"


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a message naming the field."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def choice_keys(seed: int, count: int) -> jax.Array:
    """The [count] sampling keys of a request's choices: ``fold_in(key(seed), i)``.

    Seeds from 2^32 on fold their high word in as well (jax keys take 32-bit
    seeds unless x64 is on), so every seed in [0, 2^63) has its own stream.
    """
    return seeded_keys([seed], count)


def seeded_keys(seeds, count: int) -> jax.Array:
    """``choice_keys(s, count)`` for every seed s, concatenated: [len(seeds) * count] keys."""
    seeds = np.asarray(seeds, np.uint64)
    lo_P = jnp.asarray((seeds & 0xFFFFFFFF).astype(np.uint32))
    hi_P = jnp.asarray((seeds >> 32).astype(np.uint32))
    base_P = jax.vmap(jax.random.key)(lo_P)
    data = jnp.where((hi_P != 0)[:, None], jax.random.key_data(jax.vmap(jax.random.fold_in)(base_P, hi_P)),
                     jax.random.key_data(base_P))
    index = jnp.arange(count, dtype=jnp.uint32)
    keys_PN = jax.vmap(lambda k: jax.vmap(jax.random.fold_in, (None, 0))(k, index))(jax.random.wrap_key_data(data))
    return keys_PN.reshape(-1)


# --- requests -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Completion:
    """A validated completion request."""

    prompts: list[list[int]]
    n: int
    params: sampler.SamplingParams
    seeds: tuple[int, ...] | int  # one per prompt, or one for the request
    logprobs: bool
    tokens_as_ids: bool


# Fields the server accepts; those of the second table only with their default
# (what this server does) and otherwise refused with what to use instead.
FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "best_of", "seed",
          "logprobs", "stop_token_ids", "ignore_eos", "return_tokens_as_token_ids",
          "return_token_ids", "user")
FIXED = {
    "stream": (False, "streaming is not supported; omit it or pass false"),
    "echo": (False, "echo is not supported; the prompt is not returned"),
    "stop": (None, "stop strings are not supported; pass stop_token_ids"),
    "presence_penalty": (0, "penalties are not supported; omit it or pass 0"),
    "frequency_penalty": (0, "penalties are not supported; omit it or pass 0"),
    "repetition_penalty": (1, "penalties are not supported; omit it or pass 1"),
    "logit_bias": (None, "logit_bias is not supported; omit it"),
    "suffix": (None, "suffix is not supported; omit it"),
}


def _int(body: dict, name: str, default: int, low: int, high: float = math.inf,
         allowed: str = "") -> int:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        span = allowed or (f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {high}]")
        raise RequestError(f"{name}={value!r} is not allowed; must be {span}", param=name)
    return value


def _number(body: dict, name: str, default: float, ok, allowed: str) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not ok(value):
        raise RequestError(f"{name}={value!r} is not allowed; must be {allowed}", param=name)
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name}={value!r} is not allowed; must be true or false", param=name)
    return value


def _token_list(value: Any, where: str, vocab_size: int) -> list[int]:
    if not value:
        raise RequestError(f"{where} is empty; every prompt needs at least one token", param="prompt")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise RequestError(f"{where}[{i}]={t!r} is not a token id; ids are integers in "
                               f"[0, {vocab_size})", param="prompt")
    return list(value)


def parse_prompts(value: Any, tokenizer, vocab_size: int) -> list[list[int]]:
    """The request's prompts as token ids: a string, a list of ids, or a list of either."""
    def encode(text: str, where: str) -> list[int]:
        # add_special_tokens as vLLM's completions do (a BOS for Llama-style tokenizers)
        return _token_list(list(tokenizer(text)["input_ids"]), f"{where} (encoded)", vocab_size)

    shapes = "a string, a list of token ids, or a list of strings or of token-id lists"
    if isinstance(value, str):
        return [encode(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise RequestError(f"prompt={value!r:.80} is not allowed; must be {shapes} (non-empty)",
                           param="prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [_token_list(value, "prompt", vocab_size)]
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(encode(item, f"prompt[{i}]"))
        elif isinstance(item, list):
            out.append(_token_list(item, f"prompt[{i}]", vocab_size))
        else:
            raise RequestError(f"prompt[{i}]={item!r:.80} is not allowed; prompt must be {shapes}",
                               param="prompt")
    return out


def parse_completion(body: dict, *, tokenizer, vocab_size: int, model_name: str,
                     max_model_len: int) -> Completion:
    """Validates a /v1/completions body; RequestError names the first bad field."""
    for name in body:
        if name not in FIELDS and name not in FIXED:
            raise RequestError(f"unknown field {name!r}; supported: {', '.join(FIELDS)}", param=name)
    for name, (default, why) in FIXED.items():
        value = body.get(name)
        if value is not None and value != default and value not in ([], "", {}):
            raise RequestError(f"{name}={value!r:.80} is not allowed; {why}", param=name)
    model = body.get("model")
    if model is not None and model != model_name:
        raise RequestError(f"model={model!r} is not served here; this server serves {model_name!r} "
                           "(GET /v1/models)", status=404, param="model")
    if "prompt" not in body:
        raise RequestError("prompt is missing; pass a string or a list of token ids", param="prompt")
    prompts = parse_prompts(body["prompt"], tokenizer, vocab_size)
    max_tokens = _int(body, "max_tokens", 16, 1)
    temperature = _number(body, "temperature", 1.0, lambda v: v >= 0, ">= 0 (0 = greedy)")
    top_p = _number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
    top_k = _int(body, "top_k", 0, -1, vocab_size, f"-1 or 0 (off) or an integer in [1, {vocab_size}]")
    n = _int(body, "n", 1, 1, MAX_N)
    if body.get("best_of") not in (None, 1, n) or isinstance(body.get("best_of"), bool):
        raise RequestError(f"best_of={body['best_of']!r} is not allowed; must be null, 1 or n={n} (every "
                           "sampled choice is returned)", param="best_of")
    seed = body.get("seed")
    if isinstance(seed, list):
        if len(seed) != len(prompts):
            raise RequestError(f"seed has {len(seed)} entries for {len(prompts)} prompts; pass one seed, "
                               "or a list with one per prompt", param="seed")
        for s in seed:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2 ** 63:
                raise RequestError(f"seed contains {s!r}; seeds are integers in [0, 2^63)", param="seed")
        seed = tuple(seed)
    else:
        seed = secrets.randbits(63) if seed is None else _int(body, "seed", 0, 0, 2 ** 63 - 1)
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or logprobs != 0):
        raise RequestError(f"logprobs={logprobs!r} is not allowed; must be null (none) or 0 (the sampled "
                           "tokens' log-probs, ids and entropies; top alternatives are not computed)",
                           param="logprobs")
    stops = body.get("stop_token_ids") or []
    if not isinstance(stops, list):
        raise RequestError(f"stop_token_ids={stops!r} is not allowed; must be a list of token ids",
                           param="stop_token_ids")
    for t in stops:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise RequestError(f"stop_token_ids contains {t!r}; ids are integers in [0, {vocab_size})",
                               param="stop_token_ids")
    stops = set(stops)
    if not _bool(body, "ignore_eos") and tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))  # vLLM stops at the model's eos unless told not to
    for i, p in enumerate(prompts):
        if len(p) + max_tokens > max_model_len:
            raise RequestError(f"prompt {i} has {len(p)} tokens; with max_tokens={max_tokens} that is "
                               f"{len(p) + max_tokens} > the server's max_model_len={max_model_len}",
                               param="max_tokens")
    for name in ("user",):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise RequestError(f"{name}={body[name]!r} is not allowed; must be a string", param=name)
    _bool(body, "return_token_ids")  # ids are always returned; only its type is checked
    params = sampler.SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                                    top_k=max(top_k, 0), top_p=top_p, stop_token_ids=tuple(sorted(stops)))
    return Completion(prompts, n, params, seed, logprobs is not None, _bool(body, "return_tokens_as_token_ids"))


# --- the engine: batching concurrent requests, reloading weights ------------------

@dataclasses.dataclass
class _Job:
    params: sampler.SamplingParams
    prompts: list[list[int]]
    keys: jax.Array
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class Engine:
    """The model, its tokenizer and a queue of sampling jobs.

    A request thread queues its job and then, holding the engine lock, runs
    the queued jobs that share the first one's sampling settings as one
    ``sampler.generate`` call (up to ``max_batch_rows`` rows) until its own
    job is done. Before a batch starts, the queue is given time to fill: until
    no request arrived for ``quiet_s`` (at most ``max_wait_s``), so that the
    burst of one rollout turn (one request per episode) becomes one batch of
    one shape rather than many small ones, each a compile of its own; and a
    batch smaller than ``min_batch_rows`` is filled up to it (its first row
    repeated, the copies' results dropped) so stragglers share one shape. Rows
    sample with their own keys, so batching changes no result. ``reload``
    swaps the weights between batches.
    """

    def __init__(self, model, tokenizer, *, model_path: str, name: str, dtype: str = "float32",
                 max_model_len: int | None = None, max_batch_rows: int = 256,
                 min_batch_rows: int = 32, quiet_s: float = 0.01, max_wait_s: float = 0.2):
        self.model, self.tokenizer = model, tokenizer
        self.model_path, self.name, self.dtype = model_path, name, dtype
        self.max_model_len = int(max_model_len or model.config.max_position_embeddings)
        self.max_batch_rows, self.min_batch_rows = int(max_batch_rows), int(min_batch_rows)
        self.quiet_s, self.max_wait_s = float(quiet_s), float(max_wait_s)
        self.weights_version = 0
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                          else tokenizer.eos_token_id)
        self._lock = threading.Lock()
        # Fast tokenizers reconfigure their Rust core on every call; concurrent
        # calls from request threads can collide ("Already borrowed").
        self.tokenizer_lock = threading.Lock()
        self._queue: list[_Job] = []
        self._queue_lock = threading.Lock()

    @classmethod
    def load(cls, directory: str, *, name: str | None = None, dtype: str = "float32", **kwargs) -> "Engine":
        model, tokenizer = hf.from_pretrained(directory, dtype=dtype, require_chat_template=False)
        return cls(model, tokenizer, model_path=os.path.abspath(directory),
                   name=name or directory, dtype=dtype, **kwargs)

    def sample(self, params: sampler.SamplingParams, prompts: list[list[int]], keys: jax.Array):
        """(tokens, logprobs, entropies) lists per prompt, sampled with one key per prompt."""
        job = _Job(params, prompts, keys)
        with self._queue_lock:
            self._queue.append(job)
        while not job.done.is_set():
            with self._lock:
                if job.done.is_set():
                    break
                self._run_batch()
        if job.error is not None:
            raise job.error
        return job.result

    def _queued_rows(self) -> int:
        with self._queue_lock:
            return sum(len(job.prompts) for job in self._queue)

    def _run_batch(self) -> None:
        deadline, rows = time.monotonic() + self.max_wait_s, self._queued_rows()
        while rows < self.max_batch_rows and time.monotonic() < deadline:
            time.sleep(self.quiet_s)
            rows, before = self._queued_rows(), rows
            if rows == before:
                break
        with self._queue_lock:
            if not self._queue:
                return
            params, rows, batch = self._queue[0].params, 0, []
            for job in list(self._queue):
                if job.params == params and (not batch or rows + len(job.prompts) <= self.max_batch_rows):
                    batch.append(job)
                    rows += len(job.prompts)
                    self._queue.remove(job)
        try:
            prompts = [p for job in batch for p in job.prompts]
            keys = jnp.concatenate([job.keys for job in batch])
            # Filler rows (the first row again, results dropped) up to min_batch_rows: small
            # batches then share one compiled shape instead of one per power of two.
            fill = max(0, self.min_batch_rows - len(prompts))
            prompts = prompts + [prompts[0]] * fill
            keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (fill,))]) if fill else keys
            out = sampler.generate(self.model, prompts, key=keys, params=params, pad_id=self.pad_id)
            at = 0
            for job in batch:
                rows = []
                for i in range(at, at + len(job.prompts)):
                    k = int(out.lengths[i])
                    rows.append((out.tokens[i, :k].tolist(), out.logprobs[i, :k].tolist(),
                                 out.entropy[i, :k].tolist()))
                job.result, at = rows, at + len(job.prompts)
        except Exception as e:  # noqa: BLE001 -- every waiting request gets the error
            for job in batch:
                job.error = e
        finally:
            for job in batch:
                job.done.set()

    def reload(self, directory: str) -> dict[str, Any]:
        """Loads the weights of ``directory`` (same architecture) and swaps them in."""
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise RequestError(f"model_path={directory!r} is not a directory on the server",
                               param="model_path")
        try:
            model = hf.load_model(directory, dtype=self.dtype)
        except (OSError, ValueError) as e:
            raise RequestError(f"model_path={directory!r} could not be loaded: {e}", param="model_path")
        old, new = self.model.config, model.config
        if new != old:
            diff = ", ".join(f"{f.name}: {getattr(new, f.name)!r} != {getattr(old, f.name)!r}"
                             for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(new, f.name))
            raise RequestError(f"model_path={directory!r} has another architecture than the served model "
                               f"({diff}); restart the server to serve a different model", param="model_path")
        with self._lock:
            self.model, self.model_path = model, os.path.abspath(directory)
            self.weights_version += 1
        return {"success": True, "message": f"loaded the weights of {self.model_path}",
                "model_path": self.model_path, "weights_version": self.weights_version}


# --- responses ------------------------------------------------------------------

def _choice(engine: Engine, index: int, row, stops, request: Completion) -> dict[str, Any]:
    ids, logps, ents = row
    tok = engine.tokenizer
    stopped = bool(ids) and ids[-1] in stops
    choice = {"index": index, "text": tok.decode(ids, skip_special_tokens=True),
              "finish_reason": "stop" if stopped else "length",
              "stop_reason": ids[-1] if stopped else None, "token_ids": ids, "logprobs": None}
    if request.logprobs:
        pieces = [tok.decode([t]) for t in ids]
        offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]]).tolist() if ids else []
        choice["logprobs"] = {
            "tokens": [f"token_id:{t}" for t in ids] if request.tokens_as_ids else pieces,
            "token_logprobs": logps, "text_offset": offsets, "top_logprobs": [None] * len(ids),
            "token_ids": ids, "token_entropies": ents}
    return choice


def complete(engine: Engine, body: dict) -> dict[str, Any]:
    """The /v1/completions response to ``body``."""
    with engine.tokenizer_lock:
        request = parse_completion(body, tokenizer=engine.tokenizer, vocab_size=engine.model.config.vocab_size,
                                   model_name=engine.name, max_model_len=engine.max_model_len)
    prompts = [p for p in request.prompts for _ in range(request.n)]  # choice i = prompt i // n
    if isinstance(request.seeds, tuple):
        keys = seeded_keys(request.seeds, request.n)
    else:
        keys = choice_keys(request.seeds, len(prompts))
    rows = engine.sample(request.params, prompts, keys)
    stops = set(request.params.stop_token_ids)
    completion_tokens = sum(len(r[0]) for r in rows)
    prompt_tokens = sum(len(p) for p in request.prompts)
    with engine.tokenizer_lock:
        choices = [_choice(engine, i, row, stops, request) for i, row in enumerate(rows)]
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": engine.name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def models_list(engine: Engine) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": engine.name, "object": "model", "created": 0, "owned_by": "aem_jax",
        "root": engine.model_path, "max_model_len": engine.max_model_len,
        "weights_version": engine.weights_version}]}


def _reload(engine: Engine, body: dict) -> dict[str, Any]:
    for name in body:
        if name not in ("model_path", "load_format", "abort_all_requests"):
            raise RequestError(f"unknown field {name!r}; supported: model_path", param=name)
    if body.get("load_format") not in (None, "auto", "safetensors"):
        raise RequestError(f"load_format={body['load_format']!r} is not allowed; this server reads "
                           "safetensors (omit it or pass 'auto')", param="load_format")
    if "model_path" not in body:
        raise RequestError("model_path is missing; pass the Hugging Face directory to load",
                           param="model_path")
    return engine.reload(body["model_path"])


# --- HTTP -----------------------------------------------------------------------

GET_ROUTES = ("/v1/models", "/health")
POST_ROUTES = ("/v1/completions", RELOAD_ROUTE)


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to the server's ``engine``; errors come back as OpenAI error objects."""

    protocol_version = "HTTP/1.1"
    server_version = "aem_jax.serve"

    def log_message(self, format, *args):  # noqa: A002 -- the base class's signature
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, error: RequestError) -> None:
        kind = "NotFoundError" if error.status == 404 else "BadRequestError"
        self._send(error.status, {"error": {"message": str(error), "type": kind,
                                            "param": error.param, "code": error.status}})

    def _route(self, routes: tuple[str, ...], other: tuple[str, ...]) -> str:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if path in routes:
            return path
        if path in other:
            raise RequestError(f"{self.command} {path} is not allowed; use "
                               f"{'GET' if self.command == 'POST' else 'POST'}", status=405)
        raise RequestError(f"no route {path!r}; routes: GET {', GET '.join(GET_ROUTES)}, "
                           f"POST {', POST '.join(POST_ROUTES)}", status=404)

    def _read(self) -> bytes:
        """The request body; a connection whose body cannot be read is closed after the answer."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError("the request has no Content-Length header", status=411)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"the body has {length} bytes; at most {MAX_BODY_BYTES}", status=413)
        return self.rfile.read(int(length))

    @staticmethod
    def _json(raw: bytes) -> dict:
        try:
            body = json.loads(raw or b"{}")
        except ValueError as e:
            raise RequestError(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError(f"the body must be a JSON object; got {type(body).__name__}")
        return body

    def do_GET(self):  # noqa: N802 -- BaseHTTPRequestHandler's name
        try:
            path = self._route(GET_ROUTES, POST_ROUTES)
            self._send(200, models_list(self.server.engine) if path == "/v1/models" else {"status": "ok"})
        except RequestError as e:
            self._error(e)

    def do_POST(self):  # noqa: N802
        try:
            raw = self._read()  # read first: on a kept-alive connection the next request follows it
            path = self._route(POST_ROUTES, GET_ROUTES)
            body = self._json(raw)
            engine = self.server.engine
            self._send(200, complete(engine, body) if path == "/v1/completions" else _reload(engine, body))
        except RequestError as e:
            self._error(e)
        except Exception as e:  # noqa: BLE001 -- a server error is reported, the server goes on
            self._send(500, {"error": {"message": f"{type(e).__name__}: {e}", "type": "InternalServerError",
                                       "param": None, "code": 500}})


class Server(http.server.ThreadingHTTPServer):
    """A threading HTTP server holding the ``engine``; ``port=0`` picks a free port."""

    daemon_threads = True
    request_queue_size = 1024  # listen backlog: a rollout opens one connection per episode at once

    def __init__(self, engine: Engine, host: str = DEFAULT_HOST, port: int = 0, *, verbose: bool = False):
        super().__init__((host, port), Handler)
        self.engine, self.verbose = engine, verbose

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aem_jax.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (or hub id)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one)")
    parser.add_argument("--served-model-name", default=None, help="the model's id (default: --model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + max_tokens (default: the config's max_position_embeddings)")
    parser.add_argument("--max-batch-rows", type=int, default=256,
                        help="most rows sampled in one batch of concurrent requests")
    parser.add_argument("--min-batch-rows", type=int, default=32,
                        help="smaller batches are filled up to this many rows (fewer compiled shapes)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    engine = Engine.load(args.model, name=args.served_model_name, dtype=args.dtype,
                         max_model_len=args.max_model_len, max_batch_rows=args.max_batch_rows,
                         min_batch_rows=args.min_batch_rows)
    server = Server(engine, args.host, args.port, verbose=args.verbose)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without authentication", file=sys.stderr)
    print(f"serving {engine.name} on {server.url} (POST /v1/completions)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
