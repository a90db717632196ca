"""Block-wise attention transfer (``layers_per_block``): equal to joint transfer without clipping, resumable inside
a block and across finished ones, a teacher forward that stops after the block, and the setting's checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import typer
from typer.testing import CliRunner

from linearize.cli.options import settings_flags
from linearize.convert.config import ConvertConfig
from linearize.convert.pipeline import convert
from linearize.convert.transfer import TransferConfig, attention_modules, run_transfer, transfer_blocks
from linearize.errors import ConfigError
from linearize.models import classes_for
from linearize.recipes import validate_recipe
from linearize.run.progress import QuietProgress
from tests.conftest import linear_config, tiny_convert_job, tiny_model

LAYERS, STEPS = 4, 4


def _setup(**attn):
    model = tiny_model("llama", 0, num_hidden_layers=LAYERS)
    adapter = classes_for(model.config.model_type)[1].adapter
    teacher = attention_modules(model, adapter)
    cfg = linear_config(**{"window": 8, **attn})  # hybrid: the mix factors train too
    students = {i: adapter.build(m, cfg, i) for i, m in teacher.items()}
    return model, adapter, teacher, students


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 96, (8, 32), generator=g), torch.randint(0, 96, (2, 32), generator=g)


def _cfg(**kw):
    return TransferConfig(**{"lr": 1e-2, "batch_size": 2, "checkpoint_every": 0, "grad_clip": 0.0, **kw})


def _weights(students):
    return {k: v.detach().clone() for i, s in students.items() for k, v in s.linear_attn.state_dict(prefix=f"{i}.").items()}


def _transfer(work_dir, cfg, setup=None, **kw):
    model, adapter, teacher, students = setup or _setup()
    train, valid = _data()
    res = run_transfer(model, adapter, teacher, students, train, valid, cfg, work_dir=work_dir, max_steps=STEPS, **kw)
    return res, _weights(students)


def _assert_same(got, ref):
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


def _assert_same_losses(got, ref):
    assert got.layer_loss_before.keys() == ref.layer_loss_before.keys() == set(range(LAYERS))
    assert got.layer_loss_after.keys() == ref.layer_loss_after.keys() == set(range(LAYERS))
    for i in range(LAYERS):
        assert got.layer_loss_before[i] == pytest.approx(ref.layer_loss_before[i], rel=1e-6)
        assert got.layer_loss_after[i] == pytest.approx(ref.layer_loss_after[i], rel=1e-5)


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    """Joint transfer without clipping: (result, trained weights, untrained weights)."""
    setup = _setup()
    untrained = _weights(setup[3])
    res, w = _transfer(tmp_path_factory.mktemp("joint"), _cfg(), setup)
    return res, w, untrained


def test_blocks_layout():
    assert transfer_blocks([0, 1, 2, 3], None) == [[0, 1, 2, 3]]
    assert transfer_blocks([3, 0, 2, 1], 3) == [[0, 1, 2], [3]]
    assert transfer_blocks([0, 2, 3], 1) == [[0], [2], [3]]


@pytest.mark.parametrize("per_block", [1, 3], ids=["1-per-block", "3-of-4"])
def test_blockwise_equals_joint_without_clipping(tmp_path, joint, per_block):
    ref_res, ref, untrained = joint
    res, got = _transfer(tmp_path, _cfg(layers_per_block=per_block))
    assert res.blocks == transfer_blocks(range(LAYERS), per_block)
    assert res.steps == STEPS * len(res.blocks) and res.resumed_from == 0
    assert any((ref[k] - untrained[k]).abs().max() > 1e-3 for k in ref)  # training moved the maps
    _assert_same(got, ref)
    _assert_same_losses(res, ref_res)
    # every block's finished marker holds its trained parameters; the loop checkpoints are gone
    ckpt = tmp_path / "transfer-ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == [f"block-{b:02d}.done.safetensors" for b in range(len(res.blocks))]


@pytest.fixture(scope="module")
def clipped(tmp_path_factory):
    """Uninterrupted block-wise transfer with clipping: (config, result, trained weights)."""
    cfg = _cfg(layers_per_block=2, grad_clip=0.5)
    return (cfg, *_transfer(tmp_path_factory.mktemp("clipped"), cfg))


def test_blockwise_with_clipping_runs(clipped):
    _, res, got = clipped  # the global norm couples joint training's layers: nothing to compare it with
    assert res.blocks == [[0, 1], [2, 3]]
    assert set(res.layer_loss_after) == set(range(LAYERS))
    assert all(math.isfinite(v) for v in res.layer_loss_after.values())
    assert all(torch.isfinite(v).all() for v in got.values())


def test_kill_inside_block_2_and_resume_equals_uninterrupted(tmp_path, clipped):
    cfg, ref_res, ref = clipped

    part, _ = _transfer(tmp_path / "b", cfg, stop_after=STEPS + 2)  # all of block 1, two steps of block 2
    assert part.steps == STEPS + 2 and part.layer_loss_after == {}
    ckpt = tmp_path / "b" / "transfer-ckpt"
    assert (ckpt / "block-00.done.safetensors").is_file() and not (ckpt / "block-00").exists()
    assert (ckpt / "block-01" / "state.safetensors").is_file()
    # a "new process": fresh modules, block 1 loaded from its marker, block 2 resumed at its step 2
    log = []
    res, got = _transfer(tmp_path / "b", cfg, progress=QuietProgress(log.append))
    assert res.resumed_from == STEPS + 2 and res.steps == 2 * STEPS
    assert any("layers 0-1 (block 1/2): finished in an earlier run" in m for m in log), log
    assert any("resuming attention transfer, layers 2-3 (block 2/2) at step 2" in m for m in log), log
    _assert_same(got, ref)
    _assert_same_losses(res, ref_res)


class _Tasks(QuietProgress):
    def __init__(self):
        super().__init__()
        self.names = []

    def task(self, name, total, unit=""):
        self.names.append(name)
        return super().task(name, total, unit)


def test_teacher_forward_stops_after_the_block(tmp_path, joint):
    setup = _setup()
    model = setup[0]
    calls = [0] * LAYERS
    for j, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda mod, args, j=j: calls.__setitem__(j, calls[j] + 1))
    cfg = _cfg(layers_per_block=1)
    progress = _Tasks()
    part, _ = _transfer(tmp_path, cfg, setup, progress=progress, stop_after=STEPS)  # block 1 only, then stop
    assert part.steps == STEPS and part.layer_loss_after == {}
    assert calls[0] > STEPS  # before, training and after measurements
    assert calls[1:] == [0] * (LAYERS - 1), calls  # later layers never ran
    assert progress.names == ["measuring the transfer loss of layer 0 (block 1/4)",
                              "attention transfer, layer 0 (block 1/4)",
                              "measuring the transfer loss of layer 0 (block 1/4)"]
    assert (tmp_path / "transfer-ckpt" / "block-00.done.safetensors").is_file()
    # resumed at the block boundary, it finishes equal to joint training
    res, got = _transfer(tmp_path, cfg)
    assert res.resumed_from == STEPS
    _assert_same(got, joint[1])
    _assert_same_losses(res, joint[0])


def test_pipeline_kill_resume_and_report(tiny_dir, tmp_path):
    job = tiny_convert_job(tiny_dir, tmp_path / "out", layers_per_block=1)  # 6 steps per block, a checkpoint every 3
    with pytest.raises(KeyboardInterrupt):
        convert(job, log=lambda m: None, stop_after=8)
    work = tmp_path / ".out.work" / "transfer-ckpt"
    assert (work / "block-00.done.safetensors").is_file() and (work / "block-01").is_dir()
    out = convert(job, log=lambda m: None)
    report = json.loads((out / "transfer_report.json").read_text())
    assert report["transfer_blocks"] == [[0], [1]] and report["settings"]["layers_per_block"] == 1
    assert report["steps"] == 12 and report["resumed_from_step"] == 8
    assert set(report["layer_loss_after"]) == {"0", "1"}


def test_checkpoints_of_the_other_mode_are_refused(tmp_path):
    _transfer(tmp_path, _cfg(layers_per_block=2), stop_after=1)
    with pytest.raises(ConfigError, match="block-wise attention-transfer checkpoint.*same layers_per_block"):
        _transfer(tmp_path, _cfg())


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_layers_per_block(bad):
    for cls in (TransferConfig, ConvertConfig):
        with pytest.raises(ConfigError, match=f"layers_per_block={bad} must be a positive number of layers"):
            cls.build(layers_per_block=bad)
    with pytest.raises(ConfigError, match=f"convert.layers_per_block={bad} must be a positive number of layers"):
        validate_recipe({"model": "some/model", "output": "runs/x", "convert": {"layers_per_block": bad}}, [])


def test_setting_reaches_recipe_and_cli():
    assert validate_recipe({"model": "m", "output": "o"}, ["convert.layers_per_block=10"]).convert \
        .transfer().layers_per_block == 10
    assert ConvertConfig().transfer().layers_per_block is None
    got = {}
    app = typer.Typer()

    @app.command()
    @settings_flags(ConvertConfig)
    def convert(*, overrides: dict) -> None:
        got.update(overrides)

    r = CliRunner().invoke(app, ["--layers-per-block", "3"])
    assert r.exit_code == 0, r.output
    assert got == {"layers_per_block": 3}
