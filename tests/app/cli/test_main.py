"""The `vae` dispatcher: every command refuses a bad option value where it is parsed, in one line
with status 2, before any model, data or server is touched."""

from __future__ import annotations

import pytest

from app.cli.main import main as vae

BAD = [
    (["train", "d", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["train", "d", "--out", "o", "--lr", "nan"], "--lr"),
    (["train", "d", "--out", "o", "--crop", "7"], "--crop"),
    (["train", "d", "--out", "o", "--grad-accum", "0"], "--grad-accum"),
    (["train", "d", "--out", "o", "--checkpoint-every", "0"], "--checkpoint-every"),
    (["train", "d", "--out", "o", "--steps", "0"], "--steps"),
    (["train", "d", "--out", "o", "--val-images", "-1"], "--val-images"),
    (["train", "d", "--out", "o", "--ema", "2"], "--ema"),
    (["train", "d", "--out", "o", "--max-zoom", "0"], "--max-zoom"),
    (["train", "d", "--out", "o", "--seed", "-1"], "--seed"),
    (["info", "m", "--size", "-1"], "--size"),
    (["eval", "m", "--data", "d", "--size", "-1"], "--size"),
    (["eval", "m", "--data", "d", "--size", "100000"], "--size"),
    (["bench", "--models", "none=/nonexistent", "--no-kodak", "--sizes", "-8"], "--sizes"),
    (["bench", "--models", "none=/nonexistent", "--no-kodak", "--runs", "0"], "--runs"),
    (["encode", "x", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["encode", "x", "--out", "o", "--shard-size", "-1"], "--shard-size"),
    (["encode", "x", "--out", "o", "--workers", "0"], "--workers"),
    (["decode", "x", "--out", "o", "--quality", "0"], "--quality"),
    (["decode", "x", "--out", "o", "--concurrency", "0"], "--concurrency"),
]


@pytest.mark.parametrize("argv,option", BAD, ids=[" ".join(a[:1] + a[-2:]) for a, _ in BAD])
def test_bad_option_values_are_one_line_and_exit_2(argv, option, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written
    with pytest.raises(SystemExit) as info:
        vae(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {option}" in err and repr(argv[-1]) in err, err
    assert not list(tmp_path.iterdir())
