"""Cross-tokenizer losses: hand-derived values, naive loop implementations, properties, TRL GOLD parity."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from lit_distill.losses import (build_first_token_map, build_vocab_map, cross_tokenizer_loss, monotone_ends,
                                span_starts, uld_distance, vocab_map_kl)

P_S = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
P_T = torch.tensor([[0.1, 0.6, 0.2, 0.1]], dtype=torch.float64)


def naive_uld(p_s: list[float], p_t: list[float], top_k=None) -> float:
    s, t = sorted(p_s, reverse=True), sorted(p_t, reverse=True)
    width = max(len(s), len(t)) if top_k is None else top_k
    s, t = (s + [0.0] * width)[:width], (t + [0.0] * width)[:width]
    head = sum(abs(a - b) for a, b in zip(s, t))
    return head + (abs((1 - sum(s)) - (1 - sum(t))) if top_k is not None else 0.0)


def naive_span_starts(student_ends, teacher_ends):
    pairs = []
    for c in range(max(student_ends[-1], teacher_ends[-1]) + 1):
        if c == 0 or (c in student_ends and c in teacher_ends):
            i, j = sum(e <= c for e in student_ends), sum(e <= c for e in teacher_ends)
            if i < len(student_ends) and j < len(teacher_ends) and (i, j) not in pairs:
                pairs.append((i, j))
    return pairs


def test_uld_hand_derived():
    # sorted: S [.5, .3, .2, 0], T [.6, .2, .1, .1] -> |.1| + |.1| + |.1| + |.1| = 0.4
    assert_close(uld_distance(P_S.log(), P_T.log()), torch.tensor([0.4], dtype=torch.float64))
    # top-1: |.5 - .6| + |tail .5 - tail .4| = 0.2 (a lower bound); top-2: .1 + .1 + |.2 - .2| = 0.2; top-4 exact
    for k, expected in [(1, 0.2), (2, 0.2), (4, 0.4), (9, 0.4)]:
        assert_close(uld_distance(P_S.log(), P_T.log(), top_k=k), torch.tensor([expected], dtype=torch.float64))


def test_uld_matches_naive_and_bounds():
    torch.manual_seed(0)
    s, t = torch.randn(6, 7, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    for temperature in (1.0, 2.0):
        p_s, p_t = (torch.softmax(x / temperature, -1).tolist() for x in (s, t))
        for k in (None, 1, 3, 11):
            expected = torch.tensor([naive_uld(a, b, k) for a, b in zip(p_s, p_t)], dtype=torch.float64)
            assert_close(uld_distance(s, t, temperature, top_k=k), expected)
    assert (uld_distance(s, t, top_k=3) <= uld_distance(s, t) + 1e-12).all()
    # Same distribution up to a permutation of the vocabulary (and padding with zeros): distance 0.
    perm = torch.randperm(7)
    padded = torch.cat([s[:, perm], torch.full((6, 4), -torch.inf, dtype=torch.float64)], -1)
    assert_close(uld_distance(s, padded), torch.zeros(6, dtype=torch.float64))


def test_vocab_map_hand_derived():
    mapping = build_vocab_map({"a": 0, "b": 1, "c": 2}, {"b": 0, "a": 1, "x": 2, "c": 3, "pad": 7}, teacher_size=4)
    assert mapping.tolist() == [1, 0, -1, 2]
    # mapped: a .6, b .1, c .1 of matched mass .8 -> q = [.75, .125, .125]
    expected = .75 * math.log(.75 / .5) + .125 * math.log(.125 / .3) + .125 * math.log(.125 / .2)
    assert_close(vocab_map_kl(P_S.log(), P_T.log(), mapping), torch.tensor([expected], dtype=torch.float64))


def bpe_tokenizer(vocab: list[str], merges: list[tuple[str, str]], special: tuple[str, ...] = ()):
    """A fast BPE tokenizer with exactly ``vocab`` (ids in order) and ``merges``, no pre-tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(vocab)}, merges))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, additional_special_tokens=list(special))


def test_first_token_map_hand_derived():
    # Student: a, b, ab. Teacher ids: a 0, b 1, ab 2, abb 3, ba 4, bab 5, <s> 6 (special).
    student = bpe_tokenizer(["a", "b", "ab"], [("a", "b")])
    teacher = bpe_tokenizer(["a", "b", "ab", "abb", "ba", "bab", "<s>"],
                            [("a", "b"), ("ab", "b"), ("b", "a"), ("b", "ab")], special=("<s>",))
    # abb -> ab|b, ba -> b|a, bab -> b|ab: each goes to the student's first token of its text.
    assert build_first_token_map(student, teacher, 8).tolist() == [0, 1, 2, 2, 1, 1, -1, -1]
    # Exact match keeps only the shared strings a, b, ab.
    assert build_vocab_map(student.get_vocab(), teacher.get_vocab(), 8).tolist() == [0, 1, 2, -1, -1, -1, -1, -1]


def test_vocab_map_kl_matches_naive_and_is_zero_at_the_mapped_teacher():
    torch.manual_seed(1)
    s, t = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    mapping = torch.tensor([3, -1, 0, 5, -1, 1, 2, 4, -1])
    q = [[0.0] * 6 for _ in range(5)]
    p_t, p_s = torch.softmax(t, -1).tolist(), torch.softmax(s, -1).tolist()
    for a in range(5):
        for v, student_id in enumerate(mapping.tolist()):
            if student_id >= 0:
                q[a][student_id] += p_t[a][v]
        total = sum(q[a])
        q[a] = [x / total for x in q[a]]
    expected = [sum(x * math.log(x / y) for x, y in zip(q[a], p_s[a]) if x > 0) for a in range(5)]
    assert_close(vocab_map_kl(s, t, mapping), torch.tensor(expected, dtype=torch.float64))
    assert_close(vocab_map_kl(torch.tensor(q, dtype=torch.float64).log(), t, mapping),
                 torch.zeros(5, dtype=torch.float64))


def test_span_starts_hand_derived_and_naive():
    # "hello world": student "hel" "lo" " world" (ends 3 5 11), teacher "hello" " wor" "ld" (ends 5 9 11)
    assert span_starts([3, 5, 11], [5, 9, 11]) == [(0, 0), (2, 1)]
    # a leading zero-width special on the student side joins the first span; the first real tokens pair up
    assert span_starts([0, 3, 5, 11], [5, 9, 11]) == [(1, 0), (3, 1)]
    assert monotone_ends([1, 3, 4, 3, 5]) == [1, 3, 3, 3, 5]
    assert span_starts(monotone_ends([2, 3, 3, 4]), [1, 3, 4]) == [(0, 0), (3, 2)]  # a 2-byte char ending at 3
    torch.manual_seed(2)
    for _ in range(50):
        cuts_s = sorted(set(torch.randint(1, 30, (8,)).tolist()) | {30})
        cuts_t = sorted(set(torch.randint(1, 30, (5,)).tolist()) | {30})
        assert span_starts(cuts_s, cuts_t) == naive_span_starts(cuts_s, cuts_t)


def test_cross_tokenizer_loss_reference_and_reductions():
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 6, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    labels, aligned = torch.tensor([0, 3, 2, 5, 1]), torch.tensor([1, 4])
    ce = torch.nn.functional.cross_entropy(student, labels, reduction="sum")
    for method, divergence in [("uld", uld_distance(student[aligned], teacher, 2.0)),
                               ("vocab_map", vocab_map_kl(student[aligned], teacher, torch.arange(9) % 6, 2.0))]:
        loss, stats = cross_tokenizer_loss(student, labels, aligned, teacher, method=method, temperature=2.0,
                                           alpha=0.3, vocab_map=torch.arange(9) % 6, reduction="sum")
        assert_close(loss, 0.3 * ce + 0.7 * 4.0 * divergence.sum())
        mean, _ = cross_tokenizer_loss(student, labels, aligned, teacher, method=method, temperature=2.0,
                                       alpha=0.3, vocab_map=torch.arange(9) % 6)
        assert_close(mean, loss / 5)
        assert_close(stats.divergence, divergence.mean())
        assert_close(stats.ce, ce / 5)
        assert (int(stats.num_tokens), int(stats.num_aligned)) == (5, 2)


def test_cross_tokenizer_loss_gradients_and_empty():
    student = torch.randn(3, 4, requires_grad=True)
    loss, stats = cross_tokenizer_loss(student, torch.tensor([0, 1, 2]), torch.tensor([0, 2]), torch.randn(2, 7),
                                       alpha=0.0)
    loss.backward()
    assert student.grad[1].abs().sum() == 0 and student.grad[0].abs().sum() > 0  # only aligned rows are taught
    empty = torch.zeros(0, 4, requires_grad=True)
    loss, stats = cross_tokenizer_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                       torch.zeros(0, 7))
    loss.backward()
    assert loss.item() == 0 and stats.divergence.item() == 0
    with pytest.raises(ValueError, match="vocab_map"):
        cross_tokenizer_loss(student, torch.tensor([0, 1, 2]), torch.tensor([0]), torch.randn(1, 7),
                             method="vocab_map")
    with pytest.raises(ValueError, match="method"):
        cross_tokenizer_loss(student, torch.tensor([0, 1, 2]), torch.tensor([0]), torch.randn(1, 7), method="x")


def test_trl_gold_parity():
    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    torch.manual_seed(4)
    config = SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                             uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                             use_extended_uld=False, uld_token_merge_strategy="observed", uld_use_hybrid_loss=False)
    uld = gold.ULDLoss(config)
    student, teacher = torch.randn(1, 6, 10), torch.randn(1, 8, 17)
    labels_s, labels_t = torch.full((1, 6), 1), torch.full((1, 8), 1)
    labels_s[0, :2] = labels_t[0, :3] = -100  # answers: 4 student and 5 teacher positions, truncated to 4
    trl = uld(student, teacher, labels_s, labels_t, labels_s.clamp(min=0), labels_t.clamp(min=0))
    assert_close(trl, uld_distance(student[0, 2:6], teacher[0, 3:7]).mean())
    # TRL's byte-offset groups start exactly at our span starts.
    s_ends, t_ends = [2, 5, 6, 9, 12], [5, 7, 9, 10, 12]
    s_groups, t_groups = gold.ULDLoss._align_by_byte_offsets([(0, e) for e in s_ends], [(0, e) for e in t_ends])
    assert [(s[0], t[0]) for s, t in zip(s_groups, t_groups)] == span_starts(s_ends, t_ends)
