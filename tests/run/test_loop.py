"""The run skeleton both stages share (``linearize.run.loop``), without any model: a tiny least-squares problem
trained by ``run_loop`` — kill/resume and Ctrl-C/resume equal the uninterrupted run, the work folder refuses other
settings by name, the schedules come out of transformers as the loop uses them."""

from __future__ import annotations

import signal

import pytest
import torch

from linearize.errors import ConfigError, LinearizeError
from linearize.run.checkpoint import Interrupted
from linearize.run.loop import LoopConfig, WorkFolder, lr_schedule, run_loop, step_indices
from linearize.run.progress import LineProgress, QuietProgress

X = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
Y = X @ torch.arange(1.0, 6.0) + 0.1


def _problem(seed: int = 0):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(5))
    b = torch.nn.Parameter(torch.zeros(()))

    def step(i: int) -> torch.Tensor:
        idx = step_indices(i, X.shape[0], 8, seed=3)
        loss = ((X[idx] @ w + b - Y[idx]) ** 2).mean()
        loss.backward()
        return loss.detach()

    return [("w", w), ("b", b)], step


CFG = LoopConfig(lr=0.5, warmup=0.1, checkpoint_every=0)


def _run(tmp, **kw):
    named, step = _problem()
    res = run_loop(named, step, cfg=kw.pop("cfg", CFG), total_steps=20, tokens_per_step=8, checkpoint_dir=tmp,
                   name="toy", **kw)
    return res, {n: p.detach().clone() for n, p in named}


def test_loop_trains_and_resume_after_a_kill_equals_uninterrupted(tmp_path):
    ref, ref_params = _run(tmp_path / "a")
    assert ref.finished and ref.steps == 20 and len(ref.losses) == 20 and ref.losses[-1] < ref.losses[0] / 10
    part, _ = _run(tmp_path / "b", stop_after=7, extra_meta={"before": {"0": 1.5}})
    assert not part.finished and part.steps == 7 and (tmp_path / "b" / "state.safetensors").is_file()
    logs = []
    res, params = _run(tmp_path / "b", progress=QuietProgress(logs.append), extra_meta={"before": {}})
    assert res.resumed_from == 7 and res.finished and any("resuming toy at step 7 of 20" in m for m in logs)
    assert res.meta == {"before": {"0": 1.5}}  # the stage's values come back from the checkpoint
    assert res.losses == pytest.approx(ref.losses, abs=1e-6) and res.tokens == ref.tokens == 160
    for n in ref_params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=0, atol=1e-6)


def test_ctrl_c_stops_at_the_step_boundary_with_a_checkpoint(tmp_path, sigint_default):
    _, ref_params = _run(tmp_path / "a")

    def ctrl_c_at_5(step, total, loss, tps):
        if step == 5:
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted, match="stopped after step 5 of 20; checkpoint saved"):
        _run(tmp_path / "b", on_step=ctrl_c_at_5)
    res, params = _run(tmp_path / "b")
    assert res.resumed_from == 5
    for n in ref_params:
        torch.testing.assert_close(params[n], ref_params[n], rtol=0, atol=1e-6)


def test_checkpoint_for_other_parameters_is_refused(tmp_path):
    _run(tmp_path / "c", stop_after=3)
    w = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ConfigError, match="other trainable parameters"):
        run_loop([("other", w)], lambda i: torch.zeros(()), cfg=CFG, total_steps=5, tokens_per_step=1,
                 checkpoint_dir=tmp_path / "c", name="toy")


def test_plain_progress_lines_when_not_a_terminal(tmp_path):
    import io

    stream = io.StringIO()
    _run(tmp_path / "p", progress=LineProgress(stream, every_s=0.0))
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 20 and lines[-1].startswith("toy: 20/20 steps (100%) loss ")
    assert "ETA" in lines[1] and "tok/s" in lines[-1]


def test_schedules_from_transformers():
    f = [lr_schedule(LoopConfig(warmup=0.1, min_lr_frac=0.2), 50)(s) for s in range(50)]
    assert f[0] == pytest.approx(0.2) and f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    lin = [lr_schedule(LoopConfig(warmup=0.0, schedule="linear", min_lr_frac=0.0), 10)(s) for s in range(10)]
    assert lin == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert {lr_schedule(LoopConfig(warmup=0.0, schedule="constant"), 7)(s) for s in range(7)} == {1.0}


def test_loop_settings_are_checked_in_one_error():
    with pytest.raises(ConfigError, match=r"lr=0 must be positive; warmup=1.5 must be in \[0, 1\)"):
        LoopConfig.build(lr=0, warmup=1.5)


def test_work_folder_resumes_refuses_and_discards(tmp_path):
    fp = {"tokens": 10, "nested": {"a": 1}}

    def folder(f):
        return WorkFolder(tmp_path / ".o.work", f, what="toy run", discard_hint="pass --overwrite",
                          worth_keeping="data.safetensors")

    w = folder(fp).open(overwrite=False, progress=QuietProgress())
    assert not w.resumed
    built = []
    tensors, meta = w.tensors("data", lambda: (built.append(1) or {"x": torch.arange(3)}, {"source": "s"}))
    tensors2, _ = w.tensors("data", lambda: (built.append(1) or {"x": torch.zeros(3)}, {}))
    assert built == [1] and tensors2["x"].tolist() == [0, 1, 2] and meta == {"source": "s"}
    assert folder(fp).open(overwrite=False, progress=QuietProgress()).resumed
    with pytest.raises(LinearizeError, match=r"different settings \(nested.a: 1 -> 2; tokens: 10 -> 20\).*--overwrite"):
        folder({"tokens": 20, "nested": {"a": 2}}).open(overwrite=False, progress=QuietProgress())
    assert not folder({"tokens": 20}).open(overwrite=True, progress=QuietProgress()).resumed
    assert not (tmp_path / ".o.work" / "data.safetensors").exists()
    # nothing worth keeping (a run that failed before building data): other settings replace it silently
    assert not folder({"tokens": 30}).open(overwrite=False, progress=QuietProgress()).resumed
