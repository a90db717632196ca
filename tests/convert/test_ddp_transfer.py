"""Attention transfer on several processes (gloo on CPU): the same global batch split over 2 processes gives the
1-process weights, losses, steps and tokens; end to end through ``torchrun -m linearize.convert`` (joint and
block-wise), and at the level of ``run_transfer`` (random initial maps that differ per process, gradient clipping,
block-wise resume after a stop, a batch that does not split).

The run_transfer half runs this module as the workers' script: ``torchrun -m tests.convert.test_ddp_transfer OUT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import REPO, linear_config, tiny_model


def _gloo_problem() -> str | None:
    import torch.distributed as dist

    if not dist.is_available():
        return "this PyTorch has no torch.distributed"
    if not dist.is_gloo_available():
        return "this PyTorch's torch.distributed has no gloo backend"
    return None


pytestmark = pytest.mark.skipif(_gloo_problem() is not None, reason=_gloo_problem() or "")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(n: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])


# ---------------------------------------------------------------------------------------------------------------
# End to end: python -m linearize.convert on 1 process vs torchrun on 2
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [[], ["--layers-per-block", "1"]], ids=["joint", "block-wise"])
def test_torchrun_two_processes_equal_one(tiny_dir, tmp_path, mode):
    args = [str(tiny_dir), "--window", "8", "--batch-size", "4", "--tokens", str(16 * 32), "--seq-len", "32",
            "--val-tokens", str(12 * 32), "--data", str(tiny_dir.parent / "data.txt"), "--checkpoint-every", "2",
            "--device", "cpu", *mode]  # grad_clip stays 1.0: the norm is clipped after the gradients are averaged
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, "-m", "linearize.convert", *args, "--out", str(one)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=ENV, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    _torchrun(2, "-m", "linearize.convert", *args, "--out", str(two))

    r1, r2 = (json.loads((d / "transfer_report.json").read_text()) for d in (one, two))
    assert (r1["processes"], r2["processes"]) == (1, 2)
    n_blocks = 2 if mode else 1
    assert r1["steps"] == r2["steps"] == 4 * n_blocks and r1["tokens"] == r2["tokens"] == 4 * n_blocks * 4 * 32
    assert r1["transfer_blocks"] == r2["transfer_blocks"]
    for key in ("layer_loss_before", "layer_loss_after"):
        assert r1[key].keys() == r2[key].keys() == {"0", "1"}
        for i in r1[key]:
            assert r2[key][i] == pytest.approx(r1[key][i], rel=1e-5), (key, i)
    assert r2["untrained"] == pytest.approx(r1["untrained"], rel=1e-9)  # measured by the main process alone

    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert w1.keys() == w2.keys()
    maps = [k for k in w1 if ".linear_attn." in k]
    assert maps
    teacher = load_file(str(tiny_dir / "model.safetensors"))
    q_maps = [k for k in maps if k.endswith("feature_map_q.weight")]  # Hedgehog's start: the identity
    assert q_maps and all((w1[k] - torch.eye(w1[k].shape[-1])).abs().max() > 1e-3 for k in q_maps), "maps unmoved"
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-5, msg=k)
        if k in teacher:
            assert torch.equal(w2[k], teacher[k]), k  # only the maps train
    # every process left the work folder alone to the main one: nothing is left beside the export
    assert not (tmp_path / ".two.work").exists()


# ---------------------------------------------------------------------------------------------------------------
# run_transfer on 2 processes (this module as the workers' script) vs 1 process in the test
# ---------------------------------------------------------------------------------------------------------------
LAYERS, STEPS = 3, 4


def _setup(init_seed: int):
    """A tiny Llama and BASED students (random projections: ``init_seed`` sets them), hybrid (mix factors train)."""
    from linearize.convert.transfer import attention_modules
    from linearize.models import classes_for

    model = tiny_model("llama", 0, num_hidden_layers=LAYERS)
    adapter = classes_for(model.config.model_type)[1].adapter
    teacher = attention_modules(model, adapter)
    cfg = linear_config(feature_map="based", window=8)
    torch.manual_seed(init_seed)
    students = {i: adapter.build(m, cfg, i) for i, m in teacher.items()}
    return model, adapter, teacher, students


def _data():
    g = torch.Generator().manual_seed(0)  # 12 held-out sequences = 3 batches of 4: 2 + 1 over the processes
    return torch.randint(0, 96, (16, 32), generator=g), torch.randint(0, 96, (12, 32), generator=g)


def _cfg(**kw):
    from linearize.convert.config import TransferConfig

    return TransferConfig(**{"lr": 1e-2, "batch_size": 4, "checkpoint_every": 0, "grad_clip": 0.05, **kw})


SCENARIOS = {"joint": {}, "blocks": {"layers_per_block": 2}}


def _run(scenario: str, work: Path, init_seed: int, processes=None, stop_after: int | None = None):
    from linearize.convert.transfer import run_transfer

    model, adapter, teacher, students = _setup(init_seed)
    train, valid = _data()
    res = run_transfer(model, adapter, teacher, students, train, valid, _cfg(**SCENARIOS[scenario]), work_dir=work,
                       max_steps=STEPS, processes=processes, stop_after=stop_after)
    weights = {k: v.detach().clone().contiguous() for i, s in students.items()
               for k, v in s.linear_attn.state_dict(prefix=f"{i}.").items()}
    record = {"steps": res.steps, "tokens": res.tokens, "resumed_from": res.resumed_from, "blocks": res.blocks,
              "before": res.layer_loss_before, "after": res.layer_loss_after}
    return weights, record


def _worker(out: Path) -> None:
    """Every scenario on this process group; rank r writes ``<scenario>-r.safetensors`` / ``.json``."""
    from linearize.errors import ConfigError
    from linearize.run.processes import launched_processes

    procs = launched_processes("cpu")
    rank = procs.process_index
    work = out / "work"  # shared by the processes, as the conversion's work folder is
    for scenario in SCENARIOS:
        # each process starts from other random maps: run_transfer must start all from the main one's
        if scenario == "blocks":  # stopped inside the second block, then resumed
            _, rec = _run(scenario, work / scenario, init_seed=1 + rank, processes=procs, stop_after=STEPS + 1)
            assert rec["after"] == {} and rec["steps"] == STEPS + 1, rec
        weights, rec = _run(scenario, work / scenario, init_seed=1 + rank, processes=procs)
        save_file(weights, str(out / f"{scenario}-{rank}.safetensors"))
        (out / f"{scenario}-{rank}.json").write_text(json.dumps(rec))
    from linearize.convert.transfer import run_transfer

    model, adapter, teacher, students = _setup(1)
    try:
        run_transfer(model, adapter, teacher, students, *_data(), _cfg(batch_size=3), work_dir=work / "odd",
                     processes=procs)
        message = "no error"
    except ConfigError as e:
        message = str(e)
    (out / f"odd-{rank}.txt").write_text(message)


def test_run_transfer_two_processes_equal_one(tmp_path):
    _torchrun(2, "-m", "tests.convert.test_ddp_transfer", str(tmp_path))
    for scenario in SCENARIOS:
        ref_w, ref = _run(scenario, tmp_path / f"ref-{scenario}", init_seed=1)
        ref = json.loads(json.dumps(ref))
        untrained = _setup(1)[3]
        w0, w1 = (load_file(str(tmp_path / f"{scenario}-{r}.safetensors")) for r in (0, 1))
        r0, r1 = (json.loads((tmp_path / f"{scenario}-{r}.json").read_text()) for r in (0, 1))
        assert r0 == r1  # every process returns the same result (sharded measurements summed)
        n_blocks = len(ref["blocks"])
        assert r0["steps"] == ref["steps"] == STEPS * n_blocks and r0["tokens"] == ref["tokens"]
        assert r0["blocks"] == ref["blocks"] and r0["resumed_from"] == (STEPS + 1 if scenario == "blocks" else 0)
        for key in ("before", "after"):
            assert r0[key].keys() == ref[key].keys() == {str(i) for i in range(LAYERS)}
            for i in ref[key]:
                assert r0[key][i] == pytest.approx(ref[key][i], rel=1e-5), (scenario, key, i)
        assert w0.keys() == ref_w.keys()
        start = {k: v for i, s in untrained.items() for k, v in s.linear_attn.state_dict(prefix=f"{i}.").items()}
        assert any((ref_w[k] - start[k]).abs().max() > 1e-3 for k in ref_w)  # training moved the maps
        for k in ref_w:
            assert torch.equal(w0[k], w1[k]), (scenario, k)  # identical on every process
            torch.testing.assert_close(w0[k], ref_w[k], atol=1e-5, rtol=1e-5, msg=f"{scenario} {k}")
    for r in (0, 1):
        assert "must be a multiple of the number of processes (2)" in (tmp_path / f"odd-{r}.txt").read_text()


def test_share_splits_the_batch():
    from linearize.errors import ConfigError
    from linearize.run.processes import share

    class Two:
        num_processes, is_main_process = 2, False

        def __init__(self, rank):
            self.process_index = rank

    assert share(8, None) == (0, 8)
    assert share(8, Two(0)) == (0, 4) and share(8, Two(1)) == (4, 8)
    with pytest.raises(ConfigError, match="--batch-size 3 .* multiple of the number of processes \\(2\\)"):
        share(3, Two(1))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
