"""``next_token_stats`` (the KL / NLL of the conversion and finetuning reports) chunks its fp32 log-softmax over
positions: the sums equal the whole-batch formula for chunk sizes that do and do not divide the positions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import linearize.metrics as evaluate


@pytest.mark.parametrize("rows", [1, 7, 1024])
def test_chunked_stats_equal_the_whole_batch_formula(monkeypatch, rows):
    torch.manual_seed(0)
    logits, ref = torch.randn(3, 9, 50) * 3, torch.randn(3, 9, 50) * 3
    ids = torch.randint(0, 50, (3, 9))
    lp, rp = F.log_softmax(logits[:, :-1].double(), -1), F.log_softmax(ref[:, :-1].double(), -1)
    want_nll = -lp.gather(-1, ids[:, 1:, None]).sum().item()
    want_kl = (rp.exp() * (rp - lp)).sum().item()
    monkeypatch.setattr(evaluate, "STATS_ROWS", rows)
    got = evaluate.next_token_stats(logits, ids, ref)
    assert got["n"] == 24
    assert got["nll"] == pytest.approx(want_nll, rel=1e-6)
    assert got["kl"] == pytest.approx(want_kl, rel=1e-5)
    assert "kl" not in evaluate.next_token_stats(logits, ids)


def test_compare_to_teacher_scores_only_the_span():
    from tests.conftest import tiny_model

    model = tiny_model("llama", 0)
    blocks = torch.randint(0, 96, (3, 20))
    full = evaluate.compare_to_teacher(model, None, None, blocks, 2)
    assert evaluate.compare_to_teacher(model, None, None, blocks, 2, span=(1, 20)) == full
    part = evaluate.compare_to_teacher(model, None, None, blocks, 2, span=(12, 20))
    with torch.no_grad():
        lp = F.log_softmax(model(blocks).logits.double(), -1)
    nll = -lp[:, 11:19].gather(-1, blocks[:, 12:, None]).sum().item()  # logits 11..18 predict tokens 12..19
    assert part["tokens"] == 24 and part["kl"] == 0.0
    assert part["ppl_teacher"] == pytest.approx(torch.tensor(nll / 24).exp().item(), rel=1e-5)
    with pytest.raises(ValueError, match="span"):
        evaluate.compare_to_teacher(model, None, None, blocks, 2, span=(0, 20))


def test_teacher_logits_are_kept_between_measurements():
    """With a TeacherLogits, the teacher runs once per batch and span: a second measurement (another student)
    runs the student alone and gives the numbers it gives without the cache; past max_bytes nothing is kept."""
    from contextlib import contextmanager

    from tests.conftest import tiny_model

    model = tiny_model("llama", 0)
    other = tiny_model("llama", 1)
    blocks = torch.randint(0, 96, (3, 20))
    entered = []

    @contextmanager
    def teacher():
        entered.append(1)
        yield

    @contextmanager
    def student():  # another model's weights in place: the student differs from the teacher
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(other.state_dict())
        try:
            yield
        finally:
            model.load_state_dict(saved)

    kept = evaluate.TeacherLogits()
    for span in (None, (12, 20)):
        plain = evaluate.compare_to_teacher(model, teacher, student, blocks, 2, span=span)
        first = evaluate.compare_to_teacher(model, teacher, student, blocks, 2, span=span, teacher_logits=kept)
        entered.clear()
        again = evaluate.compare_to_teacher(model, teacher, student, blocks, 2, span=span, teacher_logits=kept)
        assert entered == [] and again == first == plain and plain["kl"] > 0
    assert kept.bytes == 3 * 20 * 96 * 4 + 3 * 9 * 96 * 4  # fp32 logits of the rows scored (span: 11..19) only
    small = evaluate.TeacherLogits(max_bytes=100)
    evaluate.compare_to_teacher(model, teacher, student, blocks, 2, teacher_logits=small)
    entered.clear()
    evaluate.compare_to_teacher(model, teacher, student, blocks, 2, teacher_logits=small)
    assert small.bytes == 0 and len(entered) == 2  # nothing kept: the teacher ran for both batches again
