"""models.options: the argparse checks every `vae` command shares, and one-line parse errors."""

from __future__ import annotations

import argparse

import pytest

from models import options


@pytest.mark.parametrize("check,good,bad", [
    (options.positive_int, {"1": 1, "12": 12}, ["0", "-3", "1.5", "x", ""]),
    (options.nonnegative_int, {"0": 0, "7": 7}, ["-1", "nan"]),
    (options.int_range(1, 100), {"1": 1, "100": 100}, ["0", "101"]),
    (options.multiple_of(8, 8), {"8": 8, "128": 128}, ["7", "0", "-8", "12"]),
    (options.finite_float, {"-2.5": -2.5, "1e-6": 1e-6}, ["nan", "inf", "-inf", "1e400", "x"]),
    (options.positive_float, {"2e-4": 2e-4}, ["0", "-1", "nan", "inf"]),
    (options.nonnegative_float, {"0": 0.0, "3": 3.0}, ["-0.1", "nan"]),
    (options.float_range(0.0, 1.0, high_open=True), {"0": 0.0, "0.999": 0.999}, ["1", "2", "-0.5", "nan"]),
    (options.float_range(1.0), {"1": 1.0, "2.5": 2.5}, ["0", "0.99", "inf"]),
    (options.list_of(options.multiple_of(8, 8)), {"256": (256,), "256, 384,512": (256, 384, 512)},
     ["", "256,", ",256", "256,,512", "256,12", "x", "256;384"]),
])
def test_checks_accept_good_values_and_name_bad_ones(check, good, bad):
    for text, value in good.items():
        assert check(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match="must be") as info:
            check(text)
        assert repr(text) in str(info.value)


def test_parser_errors_are_one_line_with_status_2(capsys):
    p = options.Parser(prog="vae demo")
    p.add_argument("--n", type=options.positive_int, default=1)
    with pytest.raises(SystemExit) as info:
        p.parse_args(["--n", "0"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vae demo: error: argument --n: must be an integer >= 1, got '0'")


def test_fail_folds_the_message_onto_one_line(capsys):
    assert options.fail("vae demo", "first\nsecond   third") == 2
    assert capsys.readouterr().err == "vae demo: error: first second third\n"
