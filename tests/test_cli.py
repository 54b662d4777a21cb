"""The command line: `tinylora gradcheck`, `tinylora bench kernels --help`, `tinylora demo`."""

import pytest

from tinylora.cli import main


def test_gradcheck_command_prints_a_passing_table(capsys):
    assert main(["gradcheck"]) == 0
    out = capsys.readouterr().out
    assert "attention (GQA, pad, cache)" in out and "rmsnorm" in out
    assert "all ok" in out and "FAILED" not in out


def test_gradcheck_verbose_shows_every_number(capsys):
    assert main(["gradcheck", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "== swiglu ==" in out and "direction" in out and "analytic" in out


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    assert "GFLOP/s" in capsys.readouterr().out


def test_demo_says_honestly_it_is_not_there_yet(capsys):
    assert main(["demo"]) == 2
    assert "not yet available" in capsys.readouterr().err
