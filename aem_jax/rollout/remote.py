"""A rollout policy played by an OpenAI-compatible completions server.

`EndpointPolicy` sends each prompt (token ids) to ``POST {url}/v1/completions``
as its own request with ``n=1``, ``logprobs=0`` and an integer ``seed`` drawn
from that row's key, so a row's sample depends on its key only (not on the
other rows, their order, or how the server batches them). The servers this
is meant for: ``python -m aem_jax.serve`` (this project), vLLM, SGLang and
tpu-inference (vLLM's API on TPU). `push_weights` saves a policy as a Hugging
Face directory and asks the server to load it (``reload_route``; SGLang and
``aem_jax.serve`` call it ``/update_weights_from_disk``).

Token ids of the sample are read from ``choices[i].token_ids`` (this project's
server, vLLM with ``return_token_ids``), else ``logprobs.token_ids``, else
the ``token_id:N`` strings of ``logprobs.tokens`` that vLLM writes with
``return_tokens_as_token_ids`` (which every request sets).

Entropies. An OpenAI-style server returns the sampled tokens' log-probs but
not the entropy of the distributions they came from; AEM's default signal
(``aem.signal="mean_token_entropy"``) needs it. ``entropy="exact"`` takes
``logprobs.token_entropies`` (returned by ``aem_jax.serve``) and raises
`EndpointError` when the server does not send them; ``entropy="surprisal"``
uses each token's surprisal ``-logp_t`` instead: a one-sample unbiased
estimate, since E_{y~pi'}[-log pi'(y)] = H(pi'). With it the logged token
entropy becomes the mean surprisal and the relative surprisal S_k - H_k (the
predicted entropy drift) is 0. The trainer asks for "exact" only when the
config needs entropies (AEM on with signal ``mean_token_entropy``).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import http.client
import re
import threading
import time
import urllib.parse
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aem_jax.rollout.policy import Generation, TurnContext

DEFAULT_RELOAD_ROUTE = "/update_weights_from_disk"
ENTROPY_MODES = ("exact", "surprisal")
_TOKEN_ID = re.compile(r"^token_id:(-?\d+)$")


class EndpointError(RuntimeError):
    """The endpoint refused a request or answered something this policy cannot use."""


def base_url(url: str) -> str:
    """``url`` without a trailing slash or ``/v1`` (routes are appended to it)."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


_LOCAL = threading.local()  # this thread's keep-alive connections, by (scheme, host:port)


def _connection(scheme: str, netloc: str, timeout_s: float) -> http.client.HTTPConnection:
    pool = _LOCAL.__dict__.setdefault("connections", {})
    conn = pool.get((scheme, netloc))
    if conn is None:
        cls = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
        conn = pool[(scheme, netloc)] = cls(netloc, timeout=timeout_s)
    conn.timeout = timeout_s
    return conn


def _drop_connection(scheme: str, netloc: str) -> None:
    conn = _LOCAL.__dict__.get("connections", {}).pop((scheme, netloc), None)
    if conn is not None:
        conn.close()


def _message(status: int, raw: bytes) -> str:
    """The error message of an OpenAI-style error body (else the body itself)."""
    text = raw.decode(errors="replace")
    try:
        err = json.loads(text)
    except ValueError:
        return text
    err = err.get("error", err) if isinstance(err, dict) else err
    return str(err.get("message", text)) if isinstance(err, dict) else text


def request_json(url: str, body: dict | None = None, *, timeout_s: float = 600.0, attempts: int = 3) -> dict:
    """GET (``body`` None) or POST ``body`` as JSON; the decoded JSON answer.

    Each thread keeps one HTTP/1.1 connection per server open across calls (a
    rollout sends one request per episode per turn). A connection that is
    refused, reset or closed is opened again (``attempts`` tries in all):
    every request this module sends is idempotent (seeded samples, reloads of
    one directory). Raises `EndpointError` with the server's own message for
    an HTTP error, and with the URL when the server cannot be reached or does
    not answer within ``timeout_s``.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url={url!r}; expected http(s)://host[:port]/path")
    path = parts.path or "/"
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    for attempt in range(attempts):
        conn = _connection(parts.scheme, parts.netloc, timeout_s)
        try:
            conn.request("GET" if data is None else "POST", path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except TimeoutError as e:
            _drop_connection(parts.scheme, parts.netloc)
            raise EndpointError(f"{url}: no answer within {timeout_s} s ({e})") from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, closed while idle
            _drop_connection(parts.scheme, parts.netloc)
            if attempt + 1 == attempts:
                raise EndpointError(f"{url}: cannot reach the endpoint ({type(e).__name__}: {e}; "
                                    f"{attempts} attempts)") from None
            time.sleep(0.05 * 2 ** attempt)
            continue
        if response.will_close:
            _drop_connection(parts.scheme, parts.netloc)
        if response.status >= 400:
            raise EndpointError(f"{url}: HTTP {response.status}: {_message(response.status, raw)}")
        try:
            return json.loads(raw)
        except ValueError:
            raise EndpointError(f"{url}: the answer is not JSON: {raw[:200]!r}") from None
    raise AssertionError("unreachable")


_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """One request pool per size per process: its threads, and so their open
    connections, outlive a policy (the trainer makes one per step)."""
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="endpoint")
        return _POOLS[workers]


def row_seeds(key: jax.Array, count: int) -> list[int]:
    """One integer seed in [0, 2^31) per row, from the row's key.

    ``key`` is one key (row i uses ``fold_in(key, i)``) or [count] keys (one
    per row, as the trainer passes). 31 bits fit every server's seed type.
    """
    if key.ndim:
        if key.shape != (count,):
            raise ValueError(f"key has shape {key.shape}; pass one key or one per prompt ({count},)")
        keys = key
    else:
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(count, dtype=jnp.uint32))
    bits = jax.vmap(lambda k: jax.random.bits(k, dtype=jnp.uint32))(keys)
    return [int(b) & 0x7FFFFFFF for b in np.asarray(bits)]


def parse_choice(choice: dict, *, stop_token_ids: Sequence[int], entropy: str = "exact") -> Generation:
    """The `Generation` of one completion choice (see the module docstring for the fields read)."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or lp.get("token_logprobs") is None:
        raise EndpointError("the choice has no logprobs.token_logprobs; the endpoint ignored logprobs=0")
    ids = choice.get("token_ids") or lp.get("token_ids")
    if ids is None:
        ids = []
        for t in lp.get("tokens") or []:
            match = _TOKEN_ID.match(str(t))
            if match is None:
                raise EndpointError(f"cannot read a token id from logprobs.tokens entry {t!r}; the endpoint "
                                    "returned neither token_ids nor 'token_id:N' tokens "
                                    "(vLLM: return_tokens_as_token_ids)")
            ids.append(int(match.group(1)))
    ids = [int(t) for t in ids]
    logprobs = [float(x) if x is not None else float("nan") for x in lp["token_logprobs"]]
    if len(logprobs) != len(ids) or any(not np.isfinite(x) for x in logprobs):
        raise EndpointError(f"the choice has {len(ids)} token ids but token_logprobs {logprobs!r:.200}; "
                            "expected one finite log-prob per generated token")
    stops = set(int(t) for t in stop_token_ids)
    if choice.get("finish_reason") == "stop" and (not ids or ids[-1] not in stops):
        raise EndpointError(f"the endpoint stopped (finish_reason 'stop', stop_reason "
                            f"{choice.get('stop_reason')!r}) but its last token is not one of the stop ids "
                            f"{sorted(stops)}; the rollout needs the end-of-turn token in the output (stop "
                            "strings are not supported: stop on token ids)")
    if entropy == "exact":
        ents = lp.get("token_entropies")
        if ents is None:
            raise EndpointError("the endpoint returned no logprobs.token_entropies (vLLM and SGLang do not; "
                                "python -m aem_jax.serve does). AEM's mean_token_entropy signal needs them: set "
                                "aem.signal='surprisal_per_token' or aem.enabled=False, or use "
                                "EndpointPolicy(entropy='surprisal')")
        ents = [float(x) for x in ents]
        if len(ents) != len(ids):
            raise EndpointError(f"{len(ents)} token_entropies for {len(ids)} tokens")
    elif entropy == "surprisal":
        ents = [-x for x in logprobs]
    else:
        raise ValueError(f"entropy={entropy!r}; allowed: {', '.join(ENTROPY_MODES)}")
    return Generation(ids, logprobs, ents)


class EndpointPolicy:
    """A `Policy` whose actions come from an OpenAI-compatible completions endpoint.

    Args:
      url: the server, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is dropped).
      max_tokens: tokens one action may take.
      stop_token_ids: ids that end an action (the chat's end-of-turn and eos).
      temperature, top_p, top_k: sampling settings (top_k 0 = off; sent only when set).
      model: the served model's id; default the first of ``GET /v1/models``.
      entropy: "exact" or "surprisal" (see the module docstring).
      reload_route: the route `push_weights` posts ``{"model_path": DIR}`` to.
      timeout_s: per request.
      max_concurrency: requests in flight at once (the server batches them;
        ``aem_jax.serve`` batches up to 256 rows by default).
      rows_per_request: prompts per request. None: 64 when ``GET /v1/models``
        says the server is ``aem_jax.serve`` (``owned_by`` "aem_jax"), whose
        ``seed`` may be a list with one seed per prompt, else 1 (OpenAI's
        ``seed`` is one per request). Both give the same samples.
    """

    def __init__(self, url: str, *, max_tokens: int, stop_token_ids: Sequence[int],
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 model: str | None = None, entropy: str = "exact",
                 reload_route: str = DEFAULT_RELOAD_ROUTE, timeout_s: float = 600.0,
                 max_concurrency: int = 256, rows_per_request: int | None = None):
        if entropy not in ENTROPY_MODES:
            raise ValueError(f"entropy={entropy!r}; allowed: {', '.join(ENTROPY_MODES)}")
        if not reload_route.startswith("/"):
            raise ValueError(f"reload_route={reload_route!r}; must start with '/'")
        self.url = base_url(url)
        self.max_tokens, self.stop_token_ids = int(max_tokens), tuple(int(t) for t in stop_token_ids)
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.entropy, self.reload_route = entropy, reload_route
        self.timeout_s, self.max_concurrency = float(timeout_s), int(max_concurrency)
        self._model, self._listing = model, None
        self._rows_per_request = rows_per_request

    @classmethod
    def for_rollout(cls, url: str, tokenizer: Any, config: Any, **kwargs) -> "EndpointPolicy":
        """A policy whose limits match a `RolloutConfig` (as `SamplerPolicy.for_rollout`):
        ``max_tokens = config.max_action_tokens``, stopping on the chat's end-of-turn and eos ids."""
        from aem_jax.rollout.chat import ChatFormat

        chat = ChatFormat(tokenizer, config.system_prompt,
                          enable_thinking=getattr(config, "enable_thinking", None))
        return cls(url, max_tokens=config.max_action_tokens, stop_token_ids=chat.stop_token_ids, **kwargs)

    def _served(self) -> dict:
        """The first entry of ``GET /v1/models`` (asked once)."""
        if self._listing is None:
            listing = request_json(self.url + "/v1/models", timeout_s=self.timeout_s)
            data = listing.get("data") or []
            if not data:
                raise EndpointError(f"{self.url}/v1/models lists no model")
            self._listing = dict(data[0])
        return self._listing

    @property
    def model(self) -> str:
        """The served model's id (the first of ``GET /v1/models`` unless given)."""
        if self._model is None:
            self._model = str(self._served()["id"])
        return self._model

    @property
    def rows_per_request(self) -> int:
        if self._rows_per_request is None:
            self._rows_per_request = 64 if self._served().get("owned_by") == "aem_jax" else 1
        return self._rows_per_request

    def request_body(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int]) -> dict[str, Any]:
        """The completion request of prompts (token ids) with one seed each: the
        OpenAI form (one prompt, one seed) for a single prompt, else a list of
        prompts with a list of seeds (``aem_jax.serve``'s extension)."""
        one = len(prompts) == 1
        body = {"model": self.model, "max_tokens": self.max_tokens,
                "prompt": [int(t) for t in prompts[0]] if one else [[int(t) for t in p] for p in prompts],
                "seed": int(seeds[0]) if one else [int(s) for s in seeds],
                "temperature": self.temperature, "top_p": self.top_p, "n": 1,
                "logprobs": 0, "stop_token_ids": list(self.stop_token_ids),
                "return_tokens_as_token_ids": True}
        if self.top_k > 0:
            body["top_k"] = self.top_k
        return body

    def generate(self, prompts: list[list[int]], *, key: jax.Array,
                 contexts: Sequence[TurnContext] | None = None) -> list[Generation]:
        del contexts
        if not prompts:
            return []
        seeds, k = row_seeds(key, len(prompts)), self.rows_per_request
        chunks = [range(i, min(i + k, len(prompts))) for i in range(0, len(prompts), k)]
        bodies = [self.request_body([prompts[i] for i in c], [seeds[i] for i in c]) for c in chunks]
        url = self.url + "/v1/completions"
        answers = list(_pool(self.max_concurrency).map(
            lambda b: request_json(url, b, timeout_s=self.timeout_s), bodies))
        out = []
        for chunk, answer in zip(chunks, answers):
            choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(chunk):
                raise EndpointError(f"{url}: {len(choices)} choices for prompts {chunk.start}..{chunk.stop - 1}; "
                                    f"expected {len(chunk)}")
            out += [parse_choice(c, stop_token_ids=self.stop_token_ids, entropy=self.entropy) for c in choices]
        return out

    def push_weights(self, model: Any, tokenizer: Any, directory: str | os.PathLike) -> dict:
        """Saves ``model`` to ``directory`` and has the endpoint load it (`push_weights`)."""
        return push_weights(self.url, model, tokenizer, directory, route=self.reload_route,
                            timeout_s=self.timeout_s)


def reload_weights(url: str, directory: str | os.PathLike, *, route: str = DEFAULT_RELOAD_ROUTE,
                   timeout_s: float = 600.0) -> dict:
    """Asks the endpoint to load the Hugging Face directory ``directory``: POST
    ``{"model_path": DIR}`` to ``route``. The directory must be readable by
    the server (the same machine, or a shared file system)."""
    answer = request_json(base_url(url) + route, {"model_path": os.path.abspath(os.fspath(directory))},
                          timeout_s=timeout_s)
    if isinstance(answer, dict) and answer.get("success") is False:
        raise EndpointError(f"{base_url(url)}{route}: the reload failed: {answer.get('message', answer)}")
    return answer


def push_weights(url: str, model: Any, tokenizer: Any, directory: str | os.PathLike, *,
                 route: str = DEFAULT_RELOAD_ROUTE, timeout_s: float = 600.0) -> dict:
    """Writes ``model`` and ``tokenizer`` to ``directory`` as a Hugging Face
    checkpoint (`aem_jax.models.save_pretrained`) and reloads the endpoint from it.

    Every process must call it (the save gathers sharded parameters); only
    process 0 writes and calls the endpoint.
    """
    from aem_jax.models import hf

    hf.save_pretrained(model, tokenizer, directory)
    if jax.process_index() != 0:
        return {}
    return reload_weights(url, directory, route=route, timeout_s=timeout_s)


_PUSHED: dict[str, str] = {}  # weights directory root -> the last directory pushed from it


def for_run(config: Any, rollout: Any, model: Any, tokenizer: Any, *, temperature: float) -> EndpointPolicy:
    """The trainer's policy when ``config.rollout.endpoint`` is set: ``model``'s
    weights pushed to the endpoint, then an `EndpointPolicy` at the config's
    sampling settings (``rollout`` is the run's `RolloutConfig`).

    Each push writes a new directory ``push-<k>`` under
    ``config.rollout.weights_dir`` (default: a per-process temporary
    directory) and deletes the previous one once the endpoint has loaded the
    new one. Entropies are asked for exactly when AEM uses them (on, with
    signal ``mean_token_entropy``). One process only: several processes
    would each push and play the whole step.
    """
    import shutil
    import tempfile

    r = config.rollout
    if jax.process_count() > 1:
        raise ValueError(f"config.rollout.endpoint={r.endpoint!r} is not supported with "
                         f"{jax.process_count()} processes; run the trainer as one process or set "
                         "rollout.endpoint='' (the in-process sampler)")
    root = r.weights_dir or os.path.join(tempfile.gettempdir(), f"aem_jax_weights_{os.getpid()}")
    os.makedirs(root, exist_ok=True)
    previous = _PUSHED.get(root)
    k = 0 if previous is None else int(os.path.basename(previous).split("-")[1]) + 1
    directory = os.path.join(root, f"push-{k}")
    needs_entropy = bool(config.aem.enabled) and config.aem.signal == "mean_token_entropy"
    policy = EndpointPolicy.for_rollout(r.endpoint, tokenizer, rollout, temperature=temperature,
                                        top_p=r.top_p, top_k=r.top_k, reload_route=r.reload_route,
                                        entropy="exact" if needs_entropy else "surprisal")
    policy.push_weights(model, tokenizer, directory)
    _PUSHED[root] = directory
    if previous is not None and previous != directory:
        shutil.rmtree(previous, ignore_errors=True)
    return policy
