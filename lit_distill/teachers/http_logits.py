"""A teacher-logit cache's teacher behind an OpenAI-compatible completions endpoint (a
:class:`~lit_distill.teachers.logit_cache.TopKScorer`).

The endpoint scores given token sequences, as a local teacher does (teacher forcing): each row's real tokens go out
as a token-id prompt with ``echo: true`` and ``logprobs: K``, and the legacy completions reply
(``choices[0].logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs``) holds, at each prompt token j ≥ 1, the
model's top-K log-probabilities for token j given the tokens before it and the log-probability of token j itself
(the label's). One token is generated (``max_tokens: 1``: 0 means "no limit" on some servers, is refused by
others) and ignored. The tail is 1 − Σ of the top-K probabilities, in float64 from the reply's (float32) values:
a tail mass below about 1e-7 is not resolved, where a local teacher sums the rest of the vocabulary.

Tokens come back as strings. They are mapped to the student's token ids by their bytes: a string is a token's
UTF-8 text, ``bytes:\\xe2\\x80`` for a token that is not valid UTF-8 on its own (OpenAI's form), or ``token_id:123``
(vLLM with ``extra_body: {return_tokens_as_token_ids: true}``, which needs no byte map at all). The echoed tokens
must be the ids sent; every top-K token must be exactly one id of the student's tokenizer.

What servers do (llama-cpp-python 0.3.36 tried here; the others from their documentation and issues):

- OpenAI: echo with logprobs on the legacy completions models (``babbage-002``, ``davinci-002``), at most 5.
- vLLM: at most 20 log-probs unless started with ``--max-logprobs``; ``return_tokens_as_token_ids`` makes tokens
  that are partial UTF-8 characters unambiguous.
- llama.cpp's ``llama-server``: no log-probs of the prompt (ggml-org/llama.cpp#27174).
- llama-cpp-python's ``llama_cpp.server``: not usable. It refuses token-id prompts (a validation error, answered with
  HTTP 500); the echoed log-probs of a text prompt are shifted by one token (each token comes with the distribution
  of the next, abetlen/llama-cpp-python#1983), so the first prediction and every label outside the top-K are lost;
  special tokens and partial UTF-8 characters come back as ``""``.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from lit_distill.teachers.http import _Batch, _Endpoint
from lit_distill.teachers.logit_cache import LogitCacheError, loss_positions

# log of the smallest normal float32: the tail of a position whose top-K log-probs sum to 1 or more (their
# rounding), a mass below anything the reply resolves, finite so that the loss stays finite.
TAIL_FLOOR = math.log(torch.finfo(torch.float32).tiny)
CROSS_TOKENIZER = ("the endpoint's tokenizer is not the student's (its model must be tokenized exactly as the "
                   "student is); cross-tokenizer distillation is not supported yet")
LOSSY = ("the endpoint reports such tokens lossily: it must report them by bytes (OpenAI's 'bytes:\\xNN' form) or "
         "by id (vLLM: logit_cache.endpoint.extra_body {return_tokens_as_token_ids: true})")
_BYTES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")


class HTTPLogitScorer(_Endpoint):
    """The top-K log-probabilities of a model behind ``POST {base_url}/completions``, for a teacher-logit cache.

    Requests, retries, the API key and the errors of a failed request are those of
    :class:`~lit_distill.teachers.http.HTTPTeacher` (see there): HTTP 408/409/429/5xx, timeouts and dropped
    connections are retried with backoff, ``Retry-After`` honoured; the key is read from the environment at each
    request and appears nowhere (identity, repr, errors). One request per batch row, ``concurrency`` at a time.

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the model name the endpoint serves.
        api_key_env: name of the environment variable holding the API key (None: no ``Authorization`` header).
        tokenizer: the student's tokenizer (an object, or a name/path for ``load_tokenizer``), to which the
            endpoint's token strings are mapped; ``cache_teacher`` passes the run's.
        extra_body: more fields of every request, e.g. ``{"return_tokens_as_token_ids": true}`` for vLLM; part
            of the identity (never put a secret there).
        concurrency: requests in flight at once.
        timeout: seconds each socket operation may take.
        max_retries: retries of a request after its first attempt.
        backoff: first retry wait in seconds.
        max_backoff: longest wait between two attempts, ``Retry-After`` included.
    """

    def __init__(self, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
                 tokenizer: Any = None, extra_body: Optional[dict[str, Any]] = None, concurrency: int = 4,
                 timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 30.0):
        _Endpoint.__init__(self, base_url, "completions", api_key_env, concurrency, timeout, max_retries, backoff,
                           max_backoff)
        self.model = model
        self.extra_body = dict(extra_body or {})
        self.tokenizer = tokenizer
        self._tokens: Optional[_TokenMap] = None

    @property
    def identity(self) -> dict:
        """What the manifest records: endpoint, model and request fields (never the key)."""
        return {"backend": "openai-completions", "base_url": self.base_url, "model": self.model,
                "extra_body": self.extra_body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.identity, sort_keys=True)})"

    def topk(self, batch: dict, top_k: int, temperature: float, vocab_size: int) -> dict[str, Tensor]:
        """The batch's loss positions scored by the endpoint, as ``TopKScorer`` specifies.

        Raises:
            LogitCacheError: temperature ≠ 1; a label that is not the next input token or sits after padding; a
                reply without (enough) log-probabilities; tokens that are not the student's.
            TeacherError: a request failed for good.
        """
        if temperature != 1.0:
            raise LogitCacheError(f"an endpoint's log-probabilities are its model's distribution at temperature 1; "
                                  f"this cache asks for temperature {temperature} (the DistillModule's): build it "
                                  "with temperature 1, or from a local teacher")
        self._build_token_map(vocab_size)  # here, in this thread, before the requests that read it
        positions = loss_positions(batch)  # (B, T-1)
        rows = [self._row(batch, positions, row, top_k) for row in range(len(positions))]
        scored = iter(self._parallel([row for row in rows if row.targets], self._score))
        parts = [next(scored) if row.targets else _empty(top_k) for row in rows]
        ids, values, labels = (torch.cat(column) for column in zip(*parts))
        # 1 − Σ_k p in float64: the top-K mass of a peaked position is within rounding of 1.
        mass = 1.0 - values.exp().sum(-1)  # (N,)
        tail = torch.where(mass > 0, mass.clamp(min=1e-300).log(), torch.full_like(mass, TAIL_FLOOR))
        return {"topk_ids": ids, "topk_logprobs": values.half(), "tail_logprob": tail.float(),
                "label_logprob": labels.float(), "counts": positions.sum(-1)}

    def _build_token_map(self, vocab_size: int) -> None:
        if self.tokenizer is None:
            raise LogitCacheError("HTTPLogitScorer needs the student's tokenizer (tokenizer=...) to map the "
                                  "endpoint's tokens to ids")
        if isinstance(self.tokenizer, str):
            from lit_distill.models.loading import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        if self._tokens is None:
            self._tokens = _TokenMap(self.tokenizer)
        if len(self.tokenizer) != vocab_size:
            raise LogitCacheError(f"HTTPLogitScorer's tokenizer has {len(self.tokenizer)} tokens, the cache's "
                                  f"vocabulary {vocab_size}: give it the student's tokenizer")

    @staticmethod
    def _row(batch: dict, positions: Tensor, row: int, top_k: int) -> _Row:
        """A row's real tokens and, for each of its loss positions, the index among them of the token predicted."""
        real = batch["attention_mask"][row].bool()  # (T,)
        index = torch.full(real.shape, -1, dtype=torch.long)
        index[real] = torch.arange(int(real.sum()))
        predicted = positions[row].nonzero().squeeze(-1) + 1  # (n,) padded positions of the predicted tokens
        labels, inputs = batch["labels"][row, predicted], batch["input_ids"][row, predicted]
        for target, j, before, label, token in zip(predicted.tolist(), index[predicted].tolist(),
                                                   index[predicted - 1].tolist(), labels.tolist(), inputs.tolist()):
            if j < 1 or before != j - 1:
                raise LogitCacheError(f"batch row {row}: the label at position {target} is not ignored (-100), but "
                                      "it or the token before it is padding: an endpoint scores real tokens only")
            if label != token:
                raise LogitCacheError(f"batch row {row}: the label at position {target} ({label}) is not the input "
                                      f"token there ({token}); an endpoint gives the log-probabilities of the "
                                      "input tokens")
        return _Row(row, batch["input_ids"][row][real].tolist(), index[predicted].tolist(), top_k)

    def _score(self, row: _Row, batch: _Batch) -> tuple[Tensor, Tensor, Tensor]:
        """One row's (n, K) top-K ids and float64 log-probs and (n,) label log-probs; raises LogitCacheError."""
        payload = {"model": self.model, "prompt": row.ids, "echo": True, "logprobs": row.top_k, "max_tokens": 1,
                   # Some servers apply the sampling temperature to the log-probs they report.
                   "temperature": 1.0, **self.extra_body}
        choice = self._post(payload, _first_choice, batch)
        where = f"{self.url}, batch row {row.row}"
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict) or not all(isinstance(logprobs.get(name), list)
                                                     for name in ("tokens", "token_logprobs", "top_logprobs")):
            raise LogitCacheError(f"{where}: the reply has no log-probabilities (choices[0].logprobs with tokens, "
                                  "token_logprobs and top_logprobs): the endpoint must support the legacy "
                                  "completions `logprobs` with `echo: true` (log-probabilities of the prompt), as "
                                  "vLLM and OpenAI's legacy completions models do")
        tokens, token_logprobs, top_logprobs = (logprobs[name] for name in ("tokens", "token_logprobs",
                                                                            "top_logprobs"))
        sent = len(row.ids)
        # With echo the entries cover the prompt and then the generated token, if the reply ran out of max_tokens.
        expected = sent + (choice.get("finish_reason") == "length")
        if min(len(tokens), len(token_logprobs), len(top_logprobs)) < expected:
            shifted = (" (entries for the prompt tokens only, though a token was generated: each prompt token is "
                       "reported with the distribution of the next one, as llama-cpp-python's server does, "
                       "abetlen/llama-cpp-python#1983)" if len(tokens) == sent else "")
            raise LogitCacheError(f"{where}: the reply has log-probabilities for {len(tokens)} tokens, the prompt "
                                  f"has {sent} tokens and one was generated{shifted}: the endpoint must return the "
                                  "log-probabilities of every prompt token with `echo: true`")
        for j, (text, sent_id) in enumerate(zip(tokens, row.ids)):
            self._tokens.check_echo(text, sent_id, f"{where}: echoed token {j}")
        ids, values, labels = [], [], []
        for j in row.targets:
            label, top = token_logprobs[j], top_logprobs[j]
            if not isinstance(label, (int, float)) or not isinstance(top, dict):
                raise LogitCacheError(f"{where}: token {j} has no log-probability or top log-probabilities "
                                      f"({label!r}, {str(top)[:80]})")
            by_id = {self._tokens.id(text, f"{where}: top-{row.top_k} token {text!r} at token {j}"): float(value)
                     for text, value in top.items()}
            if len(by_id) < row.top_k:
                raise LogitCacheError(f"{where}: {len(by_id)} top log-probabilities at token {j} (the token's own "
                                      f"included), logit_cache.top_k = {row.top_k} asked: the endpoint caps them "
                                      "(OpenAI at 5; vLLM at 20 unless started with --max-logprobs) or reported "
                                      "several tokens as one string; set logit_cache.top_k to its cap")
            # The reply may add the echoed token to the top-K: the K largest are the top-K. (Were it a capped K - 1
            # plus the token, the K ids would still be an exact coarsening with the tail computed below.)
            best = sorted(by_id.items(), key=lambda item: -item[1])[:row.top_k]
            ids.append([token for token, _ in best])
            values.append([value for _, value in best])
            labels.append(float(label))
        return (torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float64),
                torch.tensor(labels, dtype=torch.float64))

    def _hint(self, status: int | None) -> str:
        hint = super()._hint(status)
        if status in (400, 404, 422, 500):
            hint += (" (each request posts the prompt as token ids, with echo: true, logprobs = logit_cache.top_k "
                     "and max_tokens 1: the server must accept all of them; OpenAI allows at most 5 logprobs, vLLM "
                     "20 unless started with --max-logprobs, and llama-cpp-python's server takes text prompts only)")
        return hint


class _Row(NamedTuple):
    """A batch row to score: its real token ids and the indices among them of the tokens its loss predicts."""

    row: int
    ids: list[int]
    targets: list[int]
    top_k: int


def _empty(top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.zeros(0, top_k, dtype=torch.long), torch.zeros(0, top_k, dtype=torch.float64),
            torch.zeros(0, dtype=torch.float64))


def _first_choice(data: bytes) -> dict:
    """``choices[0]`` of a completions reply; ValueError (retried as a malformed reply) if there is none."""
    try:
        choice = json.loads(data)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"expected JSON with choices[0], got {data[:200].decode('utf-8', errors='replace')!r}") \
            from err
    if not isinstance(choice, dict):
        raise ValueError(f"expected an object at choices[0], got {str(choice)[:200]!r}")
    return choice


class _TokenMap:
    """The student's token ids by the endpoint's token strings: built once per tokenizer from the bytes of every
    vocabulary entry (byte-level BPE tokenizers: GPT-2, Llama 3, Qwen, SmolLM2, ...; added tokens by their text).

    Args:
        tokenizer: a Hugging Face tokenizer.
    """

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.size = len(tokenizer)
        self.name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        self.byte_level = "ByteLevel" in json.dumps(decoder)
        self.bytes_of: dict[int, bytes] = {}
        self.ids: dict[bytes, list[int]] = {}
        if not self.byte_level:
            return
        byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        added = {index: token.content for index, token in tokenizer.added_tokens_decoder.items()}
        for token, index in tokenizer.get_vocab().items():
            if index in added:
                data = added[index].encode("utf-8")
            elif all(char in byte_of for char in token):
                data = bytes(byte_of[char] for char in token)
            else:
                continue  # not a byte-level entry: no string can name it
            self.bytes_of[index] = data
            self.ids.setdefault(data, []).append(index)

    def parse(self, text: str, where: str) -> int | bytes:
        """The id a reported string names (``token_id:N``), else the bytes it stands for."""
        if text.startswith("token_id:"):
            try:
                index = int(text[len("token_id:"):])
            except ValueError:
                index = -1
            if not 0 <= index < self.size:
                raise LogitCacheError(f"{where}: not an id of the student's tokenizer ({self.size} tokens); "
                                      f"{CROSS_TOKENIZER}")
            return index
        if not self.byte_level:
            raise LogitCacheError(f"{where}: the student's tokenizer ({self.name}) is not byte-level BPE, so "
                                  "token strings cannot be mapped to its ids by their bytes; use a server that "
                                  "reports token ids (vLLM: logit_cache.endpoint.extra_body "
                                  "{return_tokens_as_token_ids: true})")
        if text.startswith("bytes:") and _BYTES.fullmatch(text, len("bytes:")):
            return bytes.fromhex(text[len("bytes:"):].replace("\\x", ""))
        if text == "":
            raise LogitCacheError(f"{where}: an empty string stands for a special token or bytes that are not "
                                  f"valid UTF-8; {LOSSY}")
        if "\ufffd" in text:
            raise LogitCacheError(f"{where}: U+FFFD (the replacement character) stands for bytes that are not "
                                  f"valid UTF-8; {LOSSY}")
        return text.encode("utf-8")

    def id(self, text: str, where: str) -> int:
        """The one id of the student's tokenizer that ``text`` names; LogitCacheError naming ``where`` if none."""
        parsed = self.parse(text, where)
        if isinstance(parsed, int):
            return parsed
        ids = self.ids.get(parsed, [])
        if not ids:
            raise LogitCacheError(f"{where}: no token of the student's tokenizer ({self.name}) has the bytes "
                                  f"{parsed!r}; {CROSS_TOKENIZER}")
        if len(ids) > 1:
            raise LogitCacheError(f"{where}: ids {ids} of the student's tokenizer all have the bytes {parsed!r}; "
                                  "use a server that reports token ids (vLLM: logit_cache.endpoint.extra_body "
                                  "{return_tokens_as_token_ids: true})")
        return ids[0]

    def check_echo(self, text: str, sent: int, where: str) -> None:
        """LogitCacheError unless ``text`` names the id ``sent`` (its bytes may be those of other ids too)."""
        parsed = self.parse(text, where + f" {text!r}")
        if parsed != (sent if isinstance(parsed, int) else self.bytes_of.get(sent)):
            raise LogitCacheError(f"{where} is {text!r}, the id sent there is {sent} "
                                  f"({self.bytes_of.get(sent)!r}): the endpoint tokenized the prompt otherwise, "
                                  f"or {CROSS_TOKENIZER}")


def scorer_from_endpoint(endpoint: dict[str, Any], tokenizer) -> HTTPLogitScorer:
    """The scorer ``logit_cache.endpoint`` describes, mapping tokens to ``tokenizer`` (the run's student's).

    Raises:
        LogitCacheError: a key of ``endpoint`` is no :class:`HTTPLogitScorer` argument (``tokenizer`` is not one
            there: the cache is the student's).
    """
    options = set(inspect.signature(HTTPLogitScorer).parameters) - {"tokenizer"}
    unknown = sorted(set(endpoint) - options)
    if unknown:
        raise LogitCacheError(f"logit_cache.endpoint: unknown option(s) {unknown}; the options are "
                              f"{sorted(options)} (the endpoint's tokens are mapped to the student's tokenizer)")
    return HTTPLogitScorer(**endpoint, tokenizer=tokenizer)
