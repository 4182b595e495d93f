"""A teacher behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp server, TGI, ...).

Only the answer text comes back (no logits), so such a teacher serves answer-level distillation: rewards for
agreeing with it, corrective SFT on its answers. (An endpoint's log-probabilities of given text, for a teacher-logit
cache, come through the completions endpoint: :mod:`lit_distill.teachers.http_logits`, which shares this module's
request machinery, :class:`_Endpoint`.)

Requests go out in parallel (``concurrency`` threads) through the standard library (no extra dependency; one
connection per request, negligible next to a model's latency). Transient failures are retried with exponential
backoff and jitter: HTTP 408, 409, 429 and 5xx, timeouts, refused / reset / dropped connections, and 200 replies
that are not chat-completion JSON. Any other 4xx is the caller's mistake (bad key, unknown model, invalid
request): it raises at once. The API key is read from the environment at each request and kept nowhere else.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import TypeVar

from lit_distill.teachers.base import (
    AnswerCallback,
    RetriesExhausted,
    Teacher,
    TeacherError,
    identity_string,
)

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 409, 429}  # and every 5xx
MAX_MESSAGE_CHARS = 500  # of a server's error text quoted in an exception
T = TypeVar("T")
R = TypeVar("R")


class _Endpoint:
    """What the clients of an OpenAI-compatible endpoint share: the URL checks, the API key (read from the
    environment at each request, redacted from server messages), one POST with retries, and requests sent in
    parallel that stop together when one fails for good.

    Subclasses call ``_Endpoint.__init__`` and may override :meth:`_hint` to explain a final failure.
    """

    # Waits between attempts; tests replace it on an instance to record the waits instead of sleeping.
    sleep = staticmethod(time.sleep)

    def __init__(self, base_url: str, route: str, api_key_env: str | None, concurrency: int, timeout: float,
                 max_retries: int, backoff: float, max_backoff: float, deadline: float = 300.0):
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # The URL itself is not echoed: it might hold a credential.
            raise ValueError(f"base_url must be an http(s) URL with a host, like http://127.0.0.1:8080/v1; got "
                             f"scheme '{parts.scheme}' and host '{parts.hostname}'")
        if parts.username or parts.password:
            raise ValueError("base_url must not contain credentials (user:password@); put the API key in the "
                             "environment variable named by api_key_env")
        for name, value, low in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not timeout > 0 or not deadline > 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(f"timeout and deadline must be > 0 and backoff, max_backoff >= 0, got {timeout}, "
                             f"{deadline}, {backoff}, {max_backoff}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/{route}"
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.deadline = deadline
        self.counts: Counter = Counter()  # requests, retries, failures/<kind>, skipped
        self._counts_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # A lock cannot be pickled (spawned DDP workers, DataLoader workers): the copy makes its own.
        return {key: value for key, value in self.__dict__.items() if key != "_counts_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _counts_lock=threading.Lock())

    def count(self, name: str, amount: int = 1) -> None:
        with self._counts_lock:
            self.counts[name] += amount

    def stats(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self.counts)

    def _parallel(self, items: Sequence[T], call: Callable[[T, _Batch], R],
                  on_result: Callable[[int, R], None] | None = None) -> list[R]:
        """``call(item, batch)`` for every item, ``concurrency`` at a time; the results in item order.

        ``on_result(index, result)`` is called in this thread as each result arrives. Once one call has failed
        for good (:class:`TeacherError`), items not yet started are dropped and calls in flight stop retrying,
        then that error is raised. Any other exception (an ``on_result`` error, an invalid reply, Ctrl-C) stops
        the batch the same way and propagates at once.
        """
        results: list[R | None] = [None] * len(items)
        if not items:
            return results
        batch = _Batch()

        def stopping(item: T) -> R:
            try:
                return call(item, batch)
            except BaseException:
                batch.stopped.set()  # at once, before this worker takes the next item
                raise

        with ThreadPoolExecutor(min(self.concurrency, len(items)), thread_name_prefix=type(self).__name__) as pool:
            futures: dict[Future, int] = {pool.submit(stopping, item): index for index, item in enumerate(items)}
            try:
                for future in as_completed(futures):
                    if future.cancelled():
                        continue
                    try:
                        result = future.result()
                    except TeacherError as err:
                        batch.fail(err)  # the first failure recorded is raised below
                        for pending in futures:
                            pending.cancel()  # those not started yet; batch.error is raised below
                        continue
                    results[futures[future]] = result
                    if on_result is not None:
                        on_result(futures[future], result)
            except BaseException:
                batch.stopped.set()
                for pending in futures:
                    pending.cancel()
                raise
        if batch.error is not None:
            raise batch.error
        return results

    def _post(self, payload: dict, parse: Callable[[bytes], R], batch: _Batch) -> R:
        """POST ``payload`` as JSON to ``self.url`` and return ``parse(body)``, retrying transient failures
        (``parse`` raising ValueError counts as one). Raises TeacherError for a refused request (recorded in
        ``batch``: the batch stops) and :class:`RetriesExhausted` when the retries run out (the caller decides)."""
        body = json.dumps(payload).encode("utf-8")
        attempts = self.max_retries + 1
        status = None
        for attempt in range(1, attempts + 1):
            if batch.stopped.is_set():
                raise TeacherError("not sent: another request of the batch failed")
            retry_after = status = None
            self.count("requests")
            try:
                data = self._read(body)
            except urllib.error.HTTPError as err:
                with err:
                    status, message = err.code, self._redact(_error_message(err))
                    if not (status in RETRYABLE_STATUS or status >= 500):
                        self.count(f"failures/http_{status}")
                        raise batch.fail(TeacherError(f"{self.url} refused the request with HTTP {status}: "
                                                      f"{message}{self._hint(status)}")) from None
                    failure, kind = f"HTTP {status}: {message}", "http_5xx" if status >= 500 else f"http_{status}"
                    if status in (429, 503):
                        retry_after = retry_after_seconds(err.headers.get("Retry-After"))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                # Timeouts, refused / reset / dropped connections. Exceptions are not chained (`from None`): they
                # would carry the request, and with it the Authorization header.
                failure = self._redact(f"{type(err).__name__}: {err}")
                kind = "timeout" if isinstance(err, TimeoutError) or "timed out" in str(err) else "connection"
            else:
                try:
                    return parse(data)
                except EmptyAnswer as err:
                    failure, kind = str(err), "empty"
                except ValueError as err:
                    failure, kind = f"malformed response: {err}", "malformed"
            self.count(f"failures/{kind}")
            if attempt < attempts:
                self.count("retries")
                self.sleep(self._delay(attempt, retry_after))
        raise RetriesExhausted(f"{self.url}: no answer after {attempts} attempt(s); last failure: "
                               f"{failure}{self._hint(status)}") from None

    def _read(self, body: bytes) -> bytes:
        """One POST's reply body; ``TimeoutError`` once ``deadline`` seconds have passed since it was sent (the
        per-operation ``timeout`` alone lets a server that trickles bytes take forever)."""
        start = time.monotonic()
        chunks = []
        with urllib.request.urlopen(self._request(body), timeout=self.timeout) as response:
            while chunk := response.read1(1 << 16):
                chunks.append(chunk)
                if time.monotonic() - start > self.deadline:
                    raise TimeoutError(f"no complete reply within the deadline of {self.deadline:g} s")
        return b"".join(chunks)

    def _request(self, body: bytes) -> urllib.request.Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return urllib.request.Request(self.url, data=body, headers=headers, method="POST")

    def _api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def _redact(self, text: str) -> str:
        """``text`` without the API key (some servers quote the key they rejected)."""
        key = self._api_key()
        return text.replace(key, "***") if key else text

    def _hint(self, status: int | None) -> str:
        """What to add to the message of a request that failed for good with HTTP ``status`` (None: no reply)."""
        if status not in (401, 403):
            return ""
        if not self.api_key_env:
            return " (no API key is sent: api_key_env is None)"
        state = "set" if self._api_key() else "not set"
        return f" (the API key comes from the environment variable {self.api_key_env}, which is {state})"

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        # Jitter spreads the retries of parallel requests that failed together.
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class HTTPTeacher(_Endpoint, Teacher):
    """Answer questions through ``POST {base_url}/chat/completions``.

    Each question is sent as ``{"model", "messages": [system?, user], "temperature", "max_tokens", "top_p",
    "stop"?}``; the answer is ``choices[0].message.content``, stripped.

    Worst case for one question: ``max_retries + 1`` attempts of at most ``deadline`` seconds each (and
    ``timeout`` per socket operation), with waits of ``backoff * 2**k`` (``k = 0, 1, ...``, times a random factor in
    [0.5, 1], at most ``max_backoff``) between them; a 429/503 reply's ``Retry-After`` (seconds or HTTP date, at
    most ``max_backoff``) replaces the computed wait. An empty or whitespace-only answer is a failed attempt, like a
    malformed reply. A question still without an answer after its retries is skipped (None, counted in
    :meth:`stats`); a refused request (4xx other than 408/409/429: a bad key, an unknown model) stops the batch:
    questions not yet sent are dropped, those in flight stop retrying, and :class:`TeacherError` is raised (answers
    that arrived were reported through ``on_answer``).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8080/v1`` or ``https://api.openai.com/v1``.
        model: the model name the endpoint serves.
        api_key_env: name of the environment variable holding the API key, sent as ``Authorization: Bearer``;
            None, or the variable unset: no ``Authorization`` header (local servers).
        temperature: sampling temperature (0 = greedy on most servers).
        max_tokens: longest answer in tokens.
        top_p: nucleus sampling mass.
        system_prompt: optional system message before each question.
        stop: up to a few strings at which the server ends an answer.
        concurrency: requests in flight at once.
        timeout: seconds each socket operation (connect, send, each read) may take.
        deadline: seconds one attempt may take in all (a server trickling its reply is cut off and retried).
        max_retries: retries of a question after its first attempt.
        backoff: first retry wait in seconds.
        max_backoff: longest wait between two attempts, ``Retry-After`` included.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 64, top_p: float = 1.0,
                 system_prompt: str | None = None, stop: Sequence[str] = (), concurrency: int = 4,
                 timeout: float = 60.0, deadline: float = 300.0, max_retries: int = 5, backoff: float = 1.0,
                 max_backoff: float = 30.0):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        _Endpoint.__init__(self, base_url, "chat/completions", api_key_env, concurrency, timeout, max_retries,
                           backoff, max_backoff, deadline)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.top_p = top_p
        self.system_prompt = system_prompt
        self.stop = list(stop)

    @property
    def identity(self) -> str:
        """Model and request settings (never the key, nor the host and port: the same server moved to another
        address keeps its cached answers)."""
        return identity_string("openai-chat", model=self.model, temperature=self.temperature,
                               max_tokens=self.max_tokens, top_p=self.top_p, system_prompt=self.system_prompt,
                               stop=self.stop)

    def answer(self, questions: list[str], on_answer: AnswerCallback | None = None) -> list[str | None]:
        """Ask every question, ``concurrency`` at a time (see :meth:`Teacher.answer`)."""
        return self._parallel(questions, self._ask_or_skip, on_answer)

    def _ask_or_skip(self, question: str, batch: _Batch) -> str | None:
        try:
            return self._ask(question, batch)
        except RetriesExhausted as err:
            self.count("skipped")
            log.warning("question skipped: %s", err)  # the server's words, with the key redacted
            return None

    def _ask(self, question: str, batch: _Batch) -> str:
        """One question's answer, retrying transient failures; raises TeacherError."""
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
            [{"role": "user", "content": question}]
        payload = {"model": self.model, "messages": messages, "temperature": self.temperature,
                   "max_tokens": self.max_tokens, "top_p": self.top_p}
        if self.stop:
            payload["stop"] = self.stop
        return self._post(payload, _content, batch)


class _Batch:
    """What the requests of one ``_parallel`` call share: the first request that fails for good stops the others."""

    def __init__(self):
        self.stopped = threading.Event()
        self.error: TeacherError | None = None
        self._lock = threading.Lock()

    def fail(self, error: TeacherError) -> TeacherError:
        """Record ``error`` (the first one recorded is the one ``_parallel`` raises), stop the batch, return it."""
        with self._lock:
            if self.error is None:
                self.error = error
        self.stopped.set()
        return error


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: a number of seconds or an HTTP date; None if absent/invalid."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - time.time())  # a date without zone is taken as GMT


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's error message: ``error.message`` of an OpenAI-style JSON body, else the body text."""
    try:
        text = err.read().decode("utf-8", errors="replace")
    except (OSError, http.client.HTTPException):
        return err.reason or "(no body)"
    try:
        error = json.loads(text).get("error")
        text = error.get("message", text) if isinstance(error, dict) else (error or text)
    except (ValueError, AttributeError):
        pass
    return str(text).strip()[:MAX_MESSAGE_CHARS] or str(err.reason)


class EmptyAnswer(ValueError):
    """A well-formed reply whose answer is empty or whitespace: no answer, never cached or compared."""


def _content(data: bytes) -> str:
    """``choices[0].message.content`` of a chat-completion reply, stripped; ValueError if there is none
    (:class:`EmptyAnswer` if it is blank)."""
    try:
        content = json.loads(data)["choices"][0]["message"]["content"].strip()  # AttributeError: null content
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise ValueError(f"expected JSON with a string at choices[0].message.content, got "
                         f"{data[:200].decode('utf-8', errors='replace')!r}") from err
    if not content:
        raise EmptyAnswer("the answer is empty")
    return content
