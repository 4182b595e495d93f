"""HTTPLogitScorer: a teacher-logit cache built through a real local completions server whose log-probabilities are
computed by the tiny teacher equals the cache built from the same model locally; faults are retried, every way a
server can fail the contract is one clear error, the key stays secret, and a DistillModule trains from the cache.
Slow tier: llama.cpp (the SmolLM2 GGUF) behind the endpoint against the local SmolLM2, and llama-cpp-python's own
server, which cannot serve a cache."""

import json
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers.convert_slow_tokenizer import bytes_to_unicode

from lit_distill.data import WikiTextDataModule
from lit_distill.models.loading import ModelSpec, build_model, load_tokenizer
from lit_distill.modules import DistillModule
from lit_distill.teachers import TeacherError
from lit_distill.teachers.http_logits import HTTPLogitScorer, _TokenMap
from lit_distill.teachers.logit_cache import (LogitCache, LogitCacheError, LogitCacheSpec, build_logit_cache,
                                              cache_teacher, expected_manifest, teacher_topk)
from test_logit_cache import QUICK_STUDENT, TEACHER, datamodule
from test_modules import fit
from test_teachers import KEY_ENV, SECRET, ChatServer, llama_cpp_server, running

BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}


class CompletionsServer(ChatServer):
    """``/v1/completions`` scoring a token-id prompt with a real model, answered in the legacy format with
    ``echo: true``: the prompt's tokens, then the one generated (greedy) token, each with its log-prob and the
    top-``logprobs`` of the distribution it was drawn from (plus itself, as OpenAI and llama.cpp add it).

    Tokens are rendered as ``tokens`` says: ``"text"`` (OpenAI: UTF-8 text, ``bytes:\\xNN`` when not valid UTF-8),
    ``"token_id"`` (vLLM's ``return_tokens_as_token_ids``), ``"lossy"`` (llama-cpp-python: invalid bytes dropped,
    special tokens empty). ``cap`` bounds the log-probs returned; ``edit(reply)`` alters each reply.
    """

    route = "/v1/completions"

    def __init__(self, model, tokenizer, tokens="text"):
        super().__init__()
        self.model, self.tokens, self.cap, self.edit = model, tokens, None, None
        self.special = {index: token.content for index, token in tokenizer.added_tokens_decoder.items()}
        self.pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    def key(self, body):
        return tuple(body["prompt"])

    def log_probs(self, ids: list[int]) -> torch.Tensor:
        """(n, V) log-probs of the token after each prompt token."""
        with torch.no_grad():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    def token_bytes(self, index: int) -> bytes:
        if index in self.special:
            return self.special[index].encode()
        return bytes(BYTE_OF[char] for char in self.pieces[index])

    def render(self, index: int) -> str:
        if self.tokens == "token_id":
            return f"token_id:{index}"
        if self.tokens == "lossy":
            return "" if index in self.special else self.token_bytes(index).decode("utf-8", errors="ignore")
        try:
            return self.token_bytes(index).decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in self.token_bytes(index))

    def answer(self, body):
        ids, k = body["prompt"], min(body["logprobs"], self.cap or body["logprobs"])
        log_p = self.log_probs(ids)  # (n, V)
        sequence = ids + [int(log_p[-1].argmax())]
        top = [None]
        for j in range(1, len(sequence)):
            values, indices = log_p[j - 1].topk(k)
            entries = {self.render(index): value for index, value in zip(indices.tolist(), values.tolist())}
            entries.setdefault(self.render(sequence[j]), float(log_p[j - 1, sequence[j]]))
            top.append(entries)
        logprobs = {"tokens": [self.render(index) for index in sequence], "text_offset": list(range(len(sequence))),
                    "token_logprobs": [None] + [float(log_p[j - 1, sequence[j]]) for j in range(1, len(sequence))],
                    "top_logprobs": top}
        reply = {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                 "choices": [{"index": 0, "text": "", "finish_reason": "length", "logprobs": logprobs}]}
        if self.edit is not None:
            self.edit(reply)
        return reply


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("lit-distill/tiny-teacher")


@pytest.fixture(scope="module")
def model(tokenizer, one_torch_thread):
    return build_model(TEACHER, tokenizer).eval()


@pytest.fixture
def server(model, tokenizer):
    with running(CompletionsServer(model, tokenizer)) as completions:
        yield completions


def endpoint(server, **options) -> dict:
    return {"base_url": server.url, "model": "tiny-teacher", "api_key_env": KEY_ENV, "backoff": 0.01, **options}


def scorer(server, tokenizer, **options) -> HTTPLogitScorer:
    """A scorer of ``server`` that records its retry waits in ``.waits`` instead of sleeping."""
    made = HTTPLogitScorer(**endpoint(server, **options), tokenizer=tokenizer)
    made.waits = []
    made.sleep = made.waits.append
    return made


def validation_batch(batch_size=4):
    data = datamodule(batch_size=batch_size)
    data.setup("fit")
    return next(iter(data.val_dataloader()))


def assert_same_scores(endpoint_scores, local_scores):
    """Equal to what the local model gives, to the cache's precision (fp16 top-k log-probs)."""
    assert torch.equal(endpoint_scores["counts"], local_scores["counts"])
    assert torch.equal(endpoint_scores["topk_ids"], local_scores["topk_ids"])
    assert_close(endpoint_scores["topk_logprobs"].float(), local_scores["topk_logprobs"].float(), rtol=1e-3,
                 atol=1e-3)
    # The endpoint's tail is 1 − Σ of rounded probabilities: compared as a mass.
    assert_close(endpoint_scores["tail_logprob"].exp(), local_scores["tail_logprob"].exp(), rtol=0, atol=1e-5)
    assert_close(endpoint_scores["label_logprob"], local_scores["label_logprob"], rtol=0, atol=1e-5)


# ---- the cache through the endpoint equals the local model's ----------------------------------------------------

@pytest.mark.parametrize("tokens", ["text", "token_id"])
def test_cache_from_the_endpoint_equals_the_cache_from_the_local_model(tmp_path, server, tokenizer, monkeypatch,
                                                                       tokens):
    monkeypatch.setenv(KEY_ENV, SECRET)
    server.tokens = tokens
    options = {"extra_body": {"return_tokens_as_token_ids": True}} if tokens == "token_id" else {}
    spec = LogitCacheSpec(path=str(tmp_path / "endpoint"), top_k=16, shard_examples=40,
                          endpoint=endpoint(server, concurrency=4, **options))
    data = datamodule()
    # All four requests of a round in flight at once, and the first row answered last.
    server.gate = threading.Barrier(4, timeout=10)
    data.setup("fit")
    first = data.datasets["train"][0]["input_ids"].tolist()
    server.faults[tuple(first)] = iter([("slow", 0.3)])
    teacher = cache_teacher(spec, None, tokenizer)
    build_logit_cache(spec, teacher, tokenizer, data, 1.0, progress=False)
    assert not server.gate.broken
    local = LogitCacheSpec(path=str(tmp_path / "local"), top_k=16, shard_examples=40)
    build_logit_cache(local, TEACHER, tokenizer, data, 1.0, progress=False)

    examples = len(data.datasets["train"]) + len(data.datasets["validation"])
    assert server.count() == examples  # one request per example
    body = server.requests[0]["body"]
    assert body["echo"] is True and body["logprobs"] == 16 and body["max_tokens"] == 1
    assert body["temperature"] == 1.0 and all(isinstance(token, int) for token in body["prompt"])
    assert (body.get("return_tokens_as_token_ids") is True) == (tokens == "token_id")
    manifest = json.loads((tmp_path / "endpoint" / "cache.json").read_text())
    assert manifest["teacher"] == {"backend": "openai-completions", "base_url": server.url, "model": "tiny-teacher",
                                   "extra_body": options.get("extra_body", {})}
    assert SECRET not in (tmp_path / "endpoint" / "cache.json").read_text()
    files = sorted(path.relative_to(local.path) for path in Path(local.path).rglob("*.safetensors"))
    assert len(files) == 3
    for name in files:
        from_endpoint, from_local = load_file(Path(spec.path) / name), load_file(Path(local.path) / name)
        assert torch.equal(from_endpoint["keys"], from_local["keys"])
        assert torch.equal(from_endpoint["offsets"], from_local["offsets"])
        assert_same_scores({**from_endpoint, "counts": from_endpoint["offsets"].diff()},
                           {**from_local, "counts": from_local["offsets"].diff()})
    LogitCache(spec.path, expected_manifest(spec, teacher, tokenizer, 1.0, data))  # complete, and it is this one


def test_padded_rows_send_their_real_tokens_only(server, tokenizer, model):
    batch = validation_batch(3)
    lengths, pad = [32, 20, 9], tokenizer.pad_token_id
    ids, mask, labels = (torch.full((3, 32), value) for value in (pad, 0, -100))
    left = {name: tensor.clone() for name, tensor in (("input_ids", ids), ("attention_mask", mask),
                                                      ("labels", labels))}
    for row, length in enumerate(lengths):
        ids[row, :length], mask[row, :length] = batch["input_ids"][row, :length], 1
        labels[row, :length] = batch["input_ids"][row, :length]
        left["input_ids"][row, 32 - length:], left["attention_mask"][row, 32 - length:] = ids[row, :length], 1
        left["labels"][row, 33 - length:] = ids[row, 1:length]  # no position predicts the first real token
    labels[1, 5:12] = -100  # a row whose loss skips a span
    right = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for padded in (right, left):
        server.requests.clear()
        scores = scorer(server, tokenizer, concurrency=2).topk(padded, 8, 1.0, len(tokenizer))
        assert [len(request["body"]["prompt"]) for request in sorted(server.requests,
                                                                     key=lambda r: -len(r["body"]["prompt"]))] \
            == lengths
        assert_same_scores(scores, teacher_topk(model, padded, 8, 1.0, len(tokenizer)))

    unpredictable = {name: tensor.clone() for name, tensor in left.items()}
    unpredictable["labels"][2, 32 - 9] = unpredictable["input_ids"][2, 32 - 9]  # predicted from a pad
    with pytest.raises(LogitCacheError, match="batch row 2: the label at position 23 is not ignored"):
        scorer(server, tokenizer).topk(unpredictable, 8, 1.0, len(tokenizer))
    relabelled = {name: tensor.clone() for name, tensor in right.items()}
    relabelled["labels"][0, 4] += 1
    with pytest.raises(LogitCacheError, match=r"batch row 0: the label at position 4 \(\d+\) is not the input"):
        scorer(server, tokenizer).topk(relabelled, 8, 1.0, len(tokenizer))


def test_distill_module_trains_from_a_cache_built_through_the_endpoint(tmp_path, server, tokenizer):
    spec = LogitCacheSpec(path=str(tmp_path / "cache"), top_k=16, endpoint=endpoint(server, concurrency=2))
    data = datamodule()
    torch.manual_seed(0)
    module = DistillModule(QUICK_STUDENT, teacher=None, alpha=0.3, logit_cache=spec)
    before = [parameter.detach().clone() for parameter in module.model.parameters()]
    trainer = fit(module, data, max_steps=3, log_every_n_steps=1)
    assert module.teacher is None and module.logit_cache.manifest["teacher"]["backend"] == "openai-completions"
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))
    asked = server.count()
    assert asked == len(data.datasets["train"]) + len(data.datasets["validation"])
    fit(DistillModule(QUICK_STUDENT, teacher=None, alpha=0.3, logit_cache=spec), datamodule(), max_steps=1)
    assert server.count() == asked  # the second run reads the cache


# ---- faults and the contract ------------------------------------------------------------------------------------

def test_transient_faults_are_retried(server, tokenizer, model):
    batch = validation_batch()
    rows = [tuple(batch["input_ids"][row].tolist()) for row in range(2)]
    server.faults[rows[0]] = iter([("status", 500, "internal error", None)])
    server.faults[rows[1]] = iter([("status", 429, "slow down", {"Retry-After": "0.25"}), ("drop",)])
    scoring = scorer(server, tokenizer, concurrency=4)
    assert_same_scores(scoring.topk(batch, 8, 1.0, len(tokenizer)), teacher_topk(model, batch, 8, 1.0,
                                                                                  len(tokenizer)))
    assert server.count(rows[0]) == 2 and server.count(rows[1]) == 3 and server.count() == 7
    assert sorted(scoring.waits)[-1] == 0.25 and len(scoring.waits) == 3  # Retry-After, else backoff · [0.5, 1]
    assert all(0.005 <= wait <= 0.02 for wait in sorted(scoring.waits)[:2])


def contract_error(server, tokenizer, top_k=8, **options) -> str:
    """The LogitCacheError of scoring a validation batch (one request at a time: row 0 fails first)."""
    with pytest.raises(LogitCacheError) as caught:
        scorer(server, tokenizer, concurrency=1, **options).topk(validation_batch(), top_k, 1.0, len(tokenizer))
    assert server.count() == 1  # not retried, and the rest not sent
    return str(caught.value)


def test_a_reply_without_logprobs_says_what_the_server_must_support(server, tokenizer):
    server.edit = lambda reply: reply["choices"][0].update(logprobs=None)
    message = contract_error(server, tokenizer)
    assert "batch row 0: the reply has no log-probabilities" in message and "`echo: true`" in message


def test_fewer_top_logprobs_than_asked_name_the_cap(server, tokenizer):
    server.cap = 5
    message = contract_error(server, tokenizer)
    # 5, or 6 with the token's own log-prob, as OpenAI and llama.cpp add it.
    assert re.search(r"batch row 0: [56] top log-probabilities at token 1 \(the token's own included\), "
                     "logit_cache.top_k = 8 asked", message)
    assert "OpenAI at 5" in message and "set logit_cache.top_k to its cap" in message


def test_a_token_the_student_does_not_have_is_a_cross_tokenizer_error(server, tokenizer):
    server.edit = lambda reply: reply["choices"][0]["logprobs"]["top_logprobs"][3].update({"é": -0.01})
    message = contract_error(server, tokenizer)
    assert "batch row 0: top-8 token 'é' at token 3: no token of the student's tokenizer" in message
    assert "the endpoint's tokenizer is not the student's" in message
    assert "cross-tokenizer distillation is not supported yet" in message


def test_an_echo_of_other_tokens_is_refused(server, tokenizer):
    sent = int(validation_batch()["input_ids"][0, 4])
    assert sent != tokenizer.convert_tokens_to_ids("Ġis")

    def retokenized(reply):
        reply["choices"][0]["logprobs"]["tokens"][4] = " is"

    server.edit = retokenized
    message = contract_error(server, tokenizer)
    assert f"batch row 0: echoed token 4 is ' is', the id sent there is {sent}" in message
    assert "tokenized the prompt otherwise" in message


def test_lossy_token_strings_are_refused(server, tokenizer):
    server.tokens = "lossy"  # llama-cpp-python: <|endoftext|> (row 0, token 27) comes back as ""
    message = contract_error(server, tokenizer)
    assert "echoed token 27 '': an empty string stands for a special token" in message
    assert "return_tokens_as_token_ids" in message and "bytes:" in message


def test_a_reply_shifted_by_one_token_is_refused(server, tokenizer):
    def shifted(reply):  # what llama-cpp-python's server returns: no entry for the generated token
        for entries in reply["choices"][0]["logprobs"].values():
            entries.pop()

    server.edit = shifted
    message = contract_error(server, tokenizer)
    assert "log-probabilities for 32 tokens, the prompt has 32 tokens and one was generated" in message
    assert "abetlen/llama-cpp-python#1983" in message


def test_temperature_other_than_one_is_refused_before_any_request(server, tokenizer):
    with pytest.raises(LogitCacheError, match="distribution at temperature 1; this cache asks for temperature 2.0"):
        scorer(server, tokenizer).topk(validation_batch(), 8, 2.0, len(tokenizer))
    assert server.count() == 0


def test_api_key_reaches_the_server_only(server, tokenizer, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    scoring, batch = scorer(server, tokenizer), validation_batch(1)
    scoring.topk(batch, 8, 1.0, len(tokenizer))
    assert server.requests[0]["authorization"] == f"Bearer {SECRET}"
    for text in (json.dumps(scoring.identity), repr(scoring), str(vars(scoring))):
        assert SECRET not in text
    row = tuple(batch["input_ids"][0].tolist())
    server.faults[row] = iter([("status", 401, f"bad key {SECRET}", None)])
    with pytest.raises(TeacherError) as caught:
        scoring.topk(batch, 8, 1.0, len(tokenizer))
    message = str(caught.value)
    assert "HTTP 401: bad key ***" in message and SECRET not in message and KEY_ENV in message
    server.faults[row] = iter([("status", 400, "logprobs > 5", None)])
    with pytest.raises(TeacherError, match="HTTP 400: logprobs > 5 .*token ids, with echo: true, logprobs = "
                                           "logit_cache.top_k"):
        scoring.topk(batch, 8, 1.0, len(tokenizer))


def test_endpoint_options_are_checked(tokenizer):
    spec = LogitCacheSpec(path="unused", endpoint={"base_url": "http://127.0.0.1:1/v1", "model": "m",
                                                   "temprature": 0.0})
    with pytest.raises(LogitCacheError, match=r"unknown option\(s\) \['temprature'\]"):
        cache_teacher(spec, None, tokenizer)
    spec.endpoint = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "tokenizer": "gpt2"}
    with pytest.raises(LogitCacheError, match=r"\['tokenizer'\].*mapped to the student's tokenizer"):
        cache_teacher(spec, None, tokenizer)
    spec.endpoint = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "api_key_env": None}
    assert cache_teacher(spec, None, tokenizer).tokenizer is tokenizer


def test_token_strings_map_to_ids_by_their_bytes(tokenizer):
    tokens = _TokenMap(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    assert tokens.id(" is", "here") == ids("Ġis") and tokens.id("<|endoftext|>", "here") == 0
    # A token that is part of a UTF-8 character: by its bytes (OpenAI), by id (vLLM), never by a lossy string.
    assert tokens.id("bytes:\\xe2", "here") == ids("â") == 162
    tokens.check_echo("bytes:\\xe2", 162, "here")
    assert tokens.id("token_id:162", "here") == 162
    for lossy, shown in (("", "an empty string"), ("\ufffd", r"U\+FFFD \(the replacement character\)")):
        with pytest.raises(LogitCacheError, match=f"here: {shown} stands for .*return_tokens_as_token_ids"):
            tokens.id(lossy, "here")
    with pytest.raises(LogitCacheError, match="not an id of the student's tokenizer"):
        tokens.id(f"token_id:{len(tokenizer)}", "here")
    with pytest.raises(LogitCacheError, match=r"no token of the student's tokenizer .* has the bytes b'\\xc3\\xa9'"):
        tokens.id("é", "here")
    with pytest.raises(LogitCacheError, match="is 'a', the id sent there is 162"):
        tokens.check_echo("a", 162, "here")
    tokens.ids[b" is"].append(999)  # two ids with one byte string
    with pytest.raises(LogitCacheError, match=r"ids \[\d+, 999\] of the student's tokenizer all have the bytes"):
        tokens.id(" is", "here")


# ---- llama.cpp (slow) -----------------------------------------------------------------------------------------

SMOLLM2 = "smollm2-135m-instruct"


def smollm2_data():
    return WikiTextDataModule(source="embedded", tokenizer=SMOLLM2, embedded_documents=60, block_size=64,
                              batch_size=8, max_blocks={"train": 8, "validation": 8})


class LlamaCppCompletions(CompletionsServer):
    """The completions endpoint with llama.cpp computing the log-probs (the SmolLM2 GGUF) and naming the tokens
    (the GGUF's own vocabulary): what a correct llama.cpp completions server would answer."""

    def __init__(self, llama, tokenizer):
        super().__init__(None, tokenizer)
        self.llama, self.llama_lock = llama, threading.Lock()

    def log_probs(self, ids):
        with self.llama_lock:  # one context
            self.llama.reset()
            self.llama.eval(ids)
            logits = torch.tensor(self.llama.scores[:len(ids)])  # (n, V)
        return torch.log_softmax(logits.float(), dim=-1)

    def token_bytes(self, index):
        return self.llama.detokenize([index], special=True)


@pytest.mark.slow
def test_llama_cpp_behind_the_endpoint_agrees_with_the_local_smollm2(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from lit_distill.models.loading import ALIASES

    tokenizer = load_tokenizer(SMOLLM2)
    llama = llama_cpp.Llama(model_path=str(ALIASES[SMOLLM2]()), logits_all=True, n_ctx=128, n_threads=2,
                            verbose=False)
    data = smollm2_data()
    with running(LlamaCppCompletions(llama, tokenizer)) as server:
        spec = LogitCacheSpec(path=str(tmp_path / "llama_cpp"), top_k=8, splits=["train"],
                              endpoint={"base_url": server.url, "model": "smollm2", "api_key_env": None,
                                        "concurrency": 1})
        build_logit_cache(spec, cache_teacher(spec, None, tokenizer), tokenizer, data, 1.0, progress=False)
    local = LogitCacheSpec(path=str(tmp_path / "local"), top_k=8, splits=["train"])
    build_logit_cache(local, ModelSpec(name_or_path=SMOLLM2), tokenizer, data, 1.0, progress=False)
    from_endpoint, from_local = (load_file(Path(path) / "train" / "shard-00000.safetensors")
                                 for path in (spec.path, local.path))
    assert torch.equal(from_endpoint["offsets"], from_local["offsets"]) and len(from_local["offsets"]) == 9
    top1 = (from_endpoint["topk_ids"][:, 0] == from_local["topk_ids"][:, 0]).float().mean().item()
    label_error = (from_endpoint["label_logprob"] - from_local["label_logprob"]).abs()
    overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in
                            zip(from_endpoint["topk_ids"], from_local["topk_ids"])]).mean().item()
    print(f"llama.cpp (GGUF) vs transformers (dequantized fp32), {len(label_error)} positions: top-1 agreement "
          f"{top1:.3f}, top-8 overlap {overlap:.3f}, |label log-prob difference| mean {label_error.mean():.4f}, "
          f"p95 {label_error.quantile(0.95):.4f}, max {label_error.max():.4f}")
    # Measured (504 positions): top-1 0.960, top-8 overlap 0.963, label error mean 0.069, p95 0.209, max 0.413 nats:
    # llama.cpp multiplies the Q4_1 weights with activations quantized to 8 bits, transformers in fp32.
    assert top1 >= 0.9 and overlap >= 0.9
    assert label_error.mean() < 0.1 and label_error.max() < 0.75


@pytest.mark.slow
def test_llama_cpp_pythons_own_server_is_refused_with_a_clear_error(tmp_path):
    """llama_cpp.server takes text prompts only (and its echoed log-probs are shifted by one): one clear error."""
    pytest.importorskip("llama_cpp.server.app")
    with llama_cpp_server("--n_ctx", "256", "--logits_all", "true", env={"OMP_NUM_THREADS": "1"}) as url:
        data = smollm2_data()
        data.setup("fit")
        batch = next(iter(data.val_dataloader()))
        tokenizer = load_tokenizer(SMOLLM2)
        scoring = HTTPLogitScorer(url, "smollm2", api_key_env=None, tokenizer=tokenizer, max_retries=0)
        with pytest.raises(TeacherError) as caught:
            scoring.topk(batch, 8, 1.0, len(tokenizer))
        message = str(caught.value)
        assert "HTTP 500" in message and "Input should be a valid string" in message
        assert "llama-cpp-python's server takes text prompts only" in message
