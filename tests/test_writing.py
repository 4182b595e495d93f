"""Teacher-written data (``python -m lit_distill write-data``): one row per prompt with the settings recorded, a
killed run resumed to the same file as an uninterrupted one, refusals on mismatched settings, user errors before
any model loads, the file read by WikiTextDataModule, and an endpoint teacher behind the answer cache."""

import hashlib
import json
import re

import pytest
import torch

from lit_distill.data import WikiTextDataModule
from lit_distill.data.io import find_split_file
from lit_distill.models import ModelSpec
from lit_distill.teachers import LocalTeacher, Teacher, TeacherError
from lit_distill.teachers import writing
from lit_distill.teachers.base import identity_string
from lit_distill.teachers.writing import CompletionWriter, WritingError, metadata_path, write_completions
from test_teachers import KEY_ENV, SECRET, server  # noqa: F401  (server: the chat-completions fixture)

TEACHER = "lit-distill/tiny-teacher"  # continues sentences of the embedded corpus: prompts are raw text
PROMPTS = ["Petra is a singer. Petra lives in", "Kira likes", "Nora owns a", "Rudi is best friends with", "Kira likes",
           "Anna has a grey horse called Bella. Anna likes to eat", "Mara is"]  # "Kira likes" twice: two rows
NAMES = ["Petra", "Kira", "Nora", "Rudi", "Mara", "Tom", "Anna", "Felix", "Olga", "Paul", "Julia", "Sam"]


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """A tiny model on a shared 2-core machine: intra-op threads cost more than they give."""


@pytest.fixture(scope="module")
def greedy_teacher():
    return LocalTeacher(ModelSpec(TEACHER), max_new_tokens=16, chat_template="none", batch_size=3)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt, "topic": "x"}) + "\n" for prompt in PROMPTS))
    return path


class Asked(Teacher):
    """``teacher`` recording the questions it is asked. ``die_after`` answers in, it dies like a killed run,
    keeping in ``on_disk`` what the file ``watch`` then holds on disk (what a SIGKILL would leave)."""

    def __init__(self, teacher: Teacher, die_after: int | None = None, watch=None):
        self.teacher = teacher
        self.die_after = die_after
        self.watch = watch
        self.asked = []
        self.on_disk = None

    @property
    def identity(self) -> str:
        return self.teacher.identity

    def answer(self, questions, on_answer=None):
        self.asked += questions
        reported = 0

        def report(index, text):
            nonlocal reported
            if reported == self.die_after:
                self.on_disk = self.watch.read_bytes()
                raise KeyboardInterrupt
            reported += 1
            on_answer(index, text)

        return self.teacher.answer(questions, on_answer=report)


class Echo(Teacher):
    """Answers a question upper-cased, without reporting through ``on_answer`` (which the writer must handle)."""

    def __init__(self, style: str = "upper"):
        self.style = style

    @property
    def identity(self) -> str:
        return identity_string("echo", style=self.style)

    def answer(self, questions, on_answer=None):
        return [question.upper() for question in questions]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_row_per_prompt_with_the_sampling_settings_recorded(prompts_file, tmp_path, capsys):
    output = tmp_path / "out" / "data.jsonl"
    writing.main(["--model", TEACHER, "--prompts", str(prompts_file), "--output", str(output), "--max-new-tokens",
                  "12", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--batch-size", "4",
                  "--chat-template", "none", "--device", "cpu"])
    written = rows(output)
    assert sorted(row["prompt"] for row in written) == sorted(PROMPTS)
    assert all(set(row) == {"prompt", "completion"} and isinstance(row["completion"], str) for row in written)
    assert any(row["completion"] for row in written)
    assert f"{output}: 7 rows (7 written now, 0 already there)" in capsys.readouterr().out

    meta = json.loads(metadata_path(output).read_text())
    assert metadata_path(output).name == "data.jsonl.meta.json"
    teacher = meta["teacher"]
    assert teacher["backend"] == "local" and teacher["model"]["name_or_path"] == TEACHER
    assert (teacher["temperature"], teacher["top_p"], teacher["seed"], teacher["max_new_tokens"]) == (0.8, 0.9, 3, 12)
    assert (teacher["system_prompt"], teacher["chat_template"]) == (None, "none")
    assert meta["prompts"]["file"] == str(prompts_file.resolve())
    assert meta["prompts"]["file_sha256"] == hashlib.sha256(prompts_file.read_bytes()).hexdigest()
    assert meta["prompts"]["count"] == len(PROMPTS)
    assert meta["settings"] == {"batch_size": 4, "cache": None}
    assert meta["created"].startswith("20")
    assert meta["lit_distill_version"]


def test_resume_after_a_kill_writes_only_the_missing_rows(greedy_teacher, tmp_path):
    reference = write_completions(greedy_teacher, PROMPTS, tmp_path / "reference.jsonl").output.read_bytes()
    assert reference.count(b"\n") == len(PROMPTS)

    output = tmp_path / "data.jsonl"
    dying = Asked(greedy_teacher, die_after=3, watch=output)
    with pytest.raises(KeyboardInterrupt):
        write_completions(dying, PROMPTS, output)
    kept = output.read_bytes()
    assert dying.on_disk == kept  # each row was flushed as it came
    assert kept.count(b"\n") == 3 and reference.startswith(kept)
    # The kill came in the middle of writing the fourth row.
    output.write_bytes(kept + reference[len(kept):reference.index(b"\n", len(kept)) - 5])
    done = [row["prompt"] for row in rows(tmp_path / "reference.jsonl")[:3]]

    resumed = Asked(greedy_teacher)
    writer = CompletionWriter(output, PROMPTS)
    assert writer.dropped_bytes > 0 and writer.rows == 3 and output.read_bytes() == kept
    summary = writer.write(resumed)
    missing = list(PROMPTS)
    for prompt in done:
        missing.remove(prompt)
    assert resumed.asked == missing
    assert (summary.rows, summary.resumed) == (len(PROMPTS), 3)
    assert output.read_bytes() == reference

    # Complete: a rerun asks nothing and changes nothing.
    again = Asked(greedy_teacher)
    assert write_completions(again, PROMPTS, output).resumed == len(PROMPTS)
    assert again.asked == [] and output.read_bytes() == reference


def test_a_rerun_with_other_settings_or_prompts_refuses(tmp_path):
    output = tmp_path / "data.jsonl"
    write_completions(Echo(), PROMPTS, output)  # Echo answers through its return value only
    assert [row["completion"] for row in rows(output)] == [prompt.upper() for prompt in PROMPTS]
    before = output.read_bytes(), metadata_path(output).read_bytes()

    with pytest.raises(WritingError, match=re.escape(f"{metadata_path(output)} records other settings than this "
                                                     f'run\'s: teacher.style (recorded "upper", now "lower")')):
        write_completions(Echo("lower"), PROMPTS, output)
    with pytest.raises(WritingError, match=r"records other prompts.*prompts \(recorded 7 .* now 6"):
        CompletionWriter(output, PROMPTS[:-1])
    assert (output.read_bytes(), metadata_path(output).read_bytes()) == before

    summary = write_completions(Echo("lower"), PROMPTS[:2], output, overwrite=True)
    assert (summary.rows, summary.resumed) == (2, 0) and len(rows(output)) == 2
    assert json.loads(metadata_path(output).read_text())["teacher"]["style"] == "lower"

    # A file of unknown provenance is not appended to; nor is a row that is not in the prompt set accepted.
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(WritingError, match=re.escape(f"{foreign} exists without its metadata file "
                                                     f"foreign.jsonl.meta.json")):
        CompletionWriter(foreign, ["a"])
    with output.open("a") as handle:
        handle.write('{"prompt": "not a prompt", "completion": "x"}\n')
    with pytest.raises(WritingError, match=re.escape(f"{output}:3: a row for a prompt that is not in the prompt")):
        CompletionWriter(output, PROMPTS[:2])


def test_user_errors_name_the_file_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(writing, "build_teacher", no_load)
    good = tmp_path / "good.txt"
    good.write_text("a prompt\n")
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"prompt": "fine"}\n{"prompt": \n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        (malformed, tmp_path / "o.jsonl", f"{malformed}:2: malformed JSON"),
        (empty, tmp_path / "o.jsonl", f"{empty}: holds no prompts"),
        (tmp_path / "missing.txt", tmp_path / "o.jsonl", f"data file '{tmp_path / 'missing.txt'}' does not exist"),
        (good, blocker / "o.jsonl", f"cannot create the output directory {blocker}: File exists"),
        (good, tmp_path / "o.txt", f"output {tmp_path / 'o.txt'} must end in .jsonl"),
    ]
    for prompts, output, message in cases:
        with pytest.raises(SystemExit, match="^" + re.escape(f"error: {message}")):
            writing.main(["--model", TEACHER, "--prompts", str(prompts), "--output", str(output)])
    for flags, message in [(["--base-url", "http://127.0.0.1:1/v1", "--seed", "1"], "--seed: for a local model"),
                           (["--top-p", "0.9"], "--top-p needs sampling")]:
        with pytest.raises(SystemExit):
            writing.main(["--model", TEACHER, "--prompts", str(good), "--output", str(tmp_path / "o.jsonl"), *flags])
        assert message in capsys.readouterr().err


def test_the_written_file_trains_in_wikitext_datamodule(greedy_teacher, tmp_path):
    output = tmp_path / "written" / "train.jsonl"
    prompts = [f"{name} likes" for name in NAMES]
    write_completions(greedy_teacher, prompts, output)
    completions = [row["completion"] for row in rows(output)]
    assert find_split_file(output.parent, "train") == output  # the metadata beside it is no split file

    data = WikiTextDataModule(source=str(output), tokenizer=TEACHER, text_field="completion", block_size=8,
                              batch_size=2, min_chars=1, validation_fraction=0.25)
    data.setup("fit")
    assert data.split_texts("validation") + data.split_texts("train") == completions
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 8)
    loss = greedy_teacher.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert torch.isfinite(loss)


def test_endpoint_teacher_behind_the_cache(server, tmp_path, monkeypatch):  # noqa: F811  (the fixture)
    monkeypatch.setenv(KEY_ENV, SECRET)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    output, cache = tmp_path / "data.jsonl", tmp_path / "cache.sqlite"
    command = ["--base-url", server.url, "--model", "test-model", "--api-key-env", KEY_ENV, "--cache", str(cache),
               "--prompts", str(prompts), "--output", str(output), "--max-new-tokens", "32", "--batch-size", "3"]
    writing.main(command)
    assert sorted(map(json.dumps, rows(output))) == sorted(json.dumps({"prompt": prompt, "completion": prompt.upper()})
                                                           for prompt in PROMPTS)
    assert server.count() == len(set(PROMPTS))  # the repeated prompt is answered from the cache
    assert all(request["authorization"] == f"Bearer {SECRET}" for request in server.requests)
    meta_text = metadata_path(output).read_text()
    assert SECRET not in meta_text
    meta = json.loads(meta_text)
    assert meta["teacher"]["backend"] == "openai-chat" and meta["teacher"]["max_tokens"] == 32
    assert meta["settings"]["cache"] == str(cache)

    writing.main(command + ["--overwrite"])  # a fresh file, every answer from the cache
    assert server.count() == len(set(PROMPTS)) and len(rows(output)) == len(PROMPTS)


def test_a_teacher_failure_keeps_the_rows_it_answered(tmp_path):
    class Failing(Echo):
        def answer(self, questions, on_answer=None):
            on_answer(1, questions[1].upper())
            raise TeacherError("endpoint down")

    output = tmp_path / "data.jsonl"
    writer = CompletionWriter(output, PROMPTS)
    with pytest.raises(TeacherError):
        writer.write(Failing())
    assert rows(output) == [{"prompt": PROMPTS[1], "completion": PROMPTS[1].upper()}]
    assert writer.remaining == [prompt for index, prompt in enumerate(PROMPTS) if index != 1]
    summary = write_completions(Echo(), PROMPTS, output)
    assert (summary.rows, summary.resumed) == (len(PROMPTS), 1)
    assert sorted(row["prompt"] for row in rows(output)) == sorted(PROMPTS)
