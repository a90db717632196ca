"""Boolean LINEARIZE_* environment switches: one parser (linearize.env.env_flag), the same spellings everywhere."""

from __future__ import annotations

import warnings

import pytest

from linearize.env import env_flag
from tests.conftest import linear_config

ON = ["1", "true", "TRUE", "True", "on", "ON", "yes", "Yes", " yes "]
OFF = ["0", "false", "FALSE", "False", "off", "Off", "no", "NO", " 0\n"]


@pytest.mark.parametrize("value", ON)
def test_on_words(monkeypatch, value):
    monkeypatch.setenv("LINEARIZE_TEST_SWITCH", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env_flag("LINEARIZE_TEST_SWITCH", False) is True


@pytest.mark.parametrize("value", OFF)
def test_off_words(monkeypatch, value):
    monkeypatch.setenv("LINEARIZE_TEST_SWITCH", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env_flag("LINEARIZE_TEST_SWITCH", True) is False


@pytest.mark.parametrize("value", [None, "", "  "])
def test_unset_or_empty_is_the_default(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("LINEARIZE_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("LINEARIZE_TEST_SWITCH", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert env_flag("LINEARIZE_TEST_SWITCH", True) is True
        assert env_flag("LINEARIZE_TEST_SWITCH", False) is False
        assert env_flag("LINEARIZE_TEST_SWITCH", None) is None


@pytest.mark.parametrize("value", ["2", "enable", "nope", "-1", "t"])
def test_anything_else_warns_with_name_and_value_and_keeps_the_default(monkeypatch, value):
    monkeypatch.setenv("LINEARIZE_TEST_SWITCH", value)
    with pytest.warns(UserWarning, match=r"LINEARIZE_TEST_SWITCH=.*not a boolean.*default \(on\)") as rec:
        assert env_flag("LINEARIZE_TEST_SWITCH", True) is True
    assert repr(value) in str(rec[0].message)
    with pytest.warns(UserWarning, match="default \\(off\\)"):
        assert env_flag("LINEARIZE_TEST_SWITCH", False) is False
    with pytest.warns(UserWarning, match="ignored"):
        assert env_flag("LINEARIZE_TEST_SWITCH", None) is None


def _linearized():
    from linearize.convert.surgery import linearize_model
    from tests.conftest import tiny_model

    return linearize_model(tiny_model("llama"), linear_config(window=8))


@pytest.mark.parametrize("value, on", [("0", False), ("false", False), ("OFF", False), ("no", False),
                                       ("1", True), ("true", True), ("on", True), ("yes", True)])
def test_cuda_graphs_switch_reads_every_spelling(monkeypatch, value, on):
    from linearize.models.graphs import graphs_enabled

    model = _linearized()
    monkeypatch.setenv("LINEARIZE_CUDA_GRAPHS", value)
    assert graphs_enabled(model) is on
    model.cuda_graphs = False  # the model's own switch still turns graphs off
    assert graphs_enabled(model) is False


def test_cuda_graphs_switch_with_a_typo_warns_and_stays_on(monkeypatch):
    from linearize.models.graphs import graphs_enabled

    monkeypatch.setenv("LINEARIZE_CUDA_GRAPHS", "flase")
    with pytest.warns(UserWarning, match="LINEARIZE_CUDA_GRAPHS='flase'"):
        assert graphs_enabled(_linearized()) is True


def test_compile_decode_switch_reads_words(monkeypatch):
    from linearize.models.graphs import compile_enabled

    model = _linearized()
    monkeypatch.setenv("LINEARIZE_COMPILE_DECODE", "yes")
    assert compile_enabled(model) is True
    model.compile_decode = True
    monkeypatch.setenv("LINEARIZE_COMPILE_DECODE", "off")
    assert compile_enabled(model) is False
    monkeypatch.setenv("LINEARIZE_COMPILE_DECODE", "")
    assert compile_enabled(model) is True  # unset/empty: the model's own setting
