"""Each plot function writes a real PNG from real results: a run_eval of the stories260K export against its
teacher and both baselines, a second conversion's result JSON, and the JSON that ``linearize bench generate`` writes (run here on a
tiny CPU geometry)."""

from __future__ import annotations

import json

import pytest

from linearize.errors import DataError
from linearize.eval.plots import plot_distance, plot_mqar, plot_passkey, plot_quality_vs_state, plot_throughput

pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install matplotlib)")


def _assert_png(path, min_width: int = 400) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[1] >= min_width and image.shape[0] >= 300
    assert image[..., :3].std() > 0.05  # axes, lines and labels, not a blank canvas


def test_passkey_and_mqar_plots(eval_run, tmp_path):
    _, result = eval_run
    _assert_png(plot_passkey(result, tmp_path / "pk.png"))
    _assert_png(plot_mqar(result, tmp_path / "mq.png"), min_width=1000)  # two panels
    alone = {"model": {k: v for k, v in result["model"].items() if k not in ("passkey", "mqar")}, "teacher": None}
    with pytest.raises(DataError, match="no passkey"):
        plot_passkey(alone, tmp_path / "none.png")
    with pytest.raises(DataError, match="no MQAR"):
        plot_mqar(alone, tmp_path / "none.png")


def test_plots_draw_the_baselines_and_perplexity_by_distance(eval_run, tmp_path):
    _, result = eval_run
    _assert_png(plot_distance(result, tmp_path / "distance.png"))
    bare = {**result, "baselines": {}}
    for plot in (plot_passkey, plot_mqar, plot_distance):
        without = [plot(bare, tmp_path / f"{plot.__name__}-{i}.png").read_bytes() for i in range(2)]
        assert without[0] == without[1]  # the same lines give the same bytes, so a difference below is the lines'
        assert plot(result, tmp_path / f"{plot.__name__}-baselines.png").read_bytes() != without[0], plot.__name__
    with pytest.raises(DataError, match="no perplexity by distance"):
        plot_distance({"model": {k: v for k, v in result["model"].items() if k != "distance"}}, tmp_path / "x.png")


def test_quality_vs_state_from_result_files(eval_run, tmp_path_factory, tmp_path):
    import torch

    from linearize.convert.surgery import linearize_model
    from linearize.eval import run_eval
    from linearize.export.writer import save_linearized
    from linearize.io.loading import load_model
    from tests.conftest import linear_config

    cfg, first = eval_run
    torch.manual_seed(1)
    net, tok = load_model(cfg.compare)
    linearize_model(net, linear_config(feature_map="elu", window=4))
    other = save_linearized(net, tmp_path_factory.mktemp("export2") / "stories-elu-w4", tokenizer=tok)
    second = run_eval(cfg.model_copy(update={"model": str(other), "tasks": ["ppl"], "json_out": None, "plot": None}))
    assert second["model"]["info"]["state_bytes"]["bytes"] < first["model"]["info"]["state_bytes"]["bytes"]
    out = plot_quality_vs_state([cfg.json_out, second], tmp_path / "quality.png")
    _assert_png(out)
    _assert_png(plot_quality_vs_state([first], tmp_path / "acc.png", metric="arc_easy acc"))
    with pytest.raises(DataError, match="no result has the metric 'nope'"):
        plot_quality_vs_state([first], tmp_path / "x.png", metric="nope")
    with pytest.raises(DataError, match="does not exist"):
        plot_quality_vs_state([tmp_path / "missing.json"], tmp_path / "x.png")


def test_throughput_from_a_bench_generate_json(tmp_path):
    from linearize.bench.generate import run_generate_bench
    from linearize.export.writer import result_rows
    from tests.conftest import tiny_bench_geometry

    cfg = tiny_bench_geometry()
    bench = tmp_path / "bench.json"
    run_generate_bench(batch_sizes=(1, 2), prompt_lens=(16,), new_tokens=4, window=8, dtype="float32", device="cpu",
                       config=cfg, json_path=str(bench), through_generate=False)
    rows = result_rows(json.loads(bench.read_text()))
    assert {r["model"] for r in rows if r.get("tok_per_s")} == {"teacher", "linear torch", "linear triton"}
    _assert_png(plot_throughput(bench, tmp_path / "throughput.png"))
    with pytest.raises(DataError, match="no bench generate row"):
        plot_throughput([{"model": "teacher", "batch": 1, "prompt": 16, "note": "out of memory"}], tmp_path / "x.png")
