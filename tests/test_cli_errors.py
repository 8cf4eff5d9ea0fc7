"""Every command answers a mistake in its input with one line on stderr that names the problem, and exit
status 2, never a traceback; a real bug still raises. Runs the real CLI (`kvrec.cli.main`) on tiny data."""

from __future__ import annotations

import argparse
import socket

import pytest

from kvrec.cli import build_parser, main

SYNTH = "synth-short:users=8,mean_len=30"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `kvrec ARGV`; argparse's own exits count as a status too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, argv, *words: str) -> str:
    code, _, err = run(capsys, *argv)
    assert "Traceback" not in err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvrec") and "error:" in lines[0]
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.fixture
def empty_csv(tmp_path):
    path = tmp_path / "empty.csv"
    path.touch()
    return path


@pytest.fixture
def foreign_dataset(tmp_path):
    """A dataset whose item ids the tiny model (ids "0".."49") has never seen."""
    path = tmp_path / "foreign.txt"
    path.write_text("".join(f"u{u} " + " ".join(f"x{u}{i}" for i in range(6)) + "\n" for u in range(4)))
    return path


def test_data_commands(capsys, tmp_path, empty_csv):
    assert_user_error(capsys, ["data", "fetch", "ml-99", "--dest", tmp_path], "unknown MovieLens dataset 'ml-99'")
    assert_user_error(capsys, ["data", "fetch", "ml-1m", "--dest", tmp_path, "--url", f"file://{tmp_path}/no.zip"],
                      "cannot download", "--url")
    assert_user_error(capsys, ["data", "synth", "--out", tmp_path, "--users", "0"], "--users", "at least 1")
    assert_user_error(capsys, ["data", "synth", "--out", tmp_path, "--mean-len", "many"], "--mean-len", "'many'")
    assert_user_error(capsys, ["data", "synth", "--out", tmp_path, "--max-len", "2"], "max_len")
    assert_user_error(capsys, ["data", "stats", tmp_path / "missing"], "not found", "synth spec")
    assert_user_error(capsys, ["data", "stats", empty_csv], "empty file")
    assert_user_error(capsys, ["data", "stats", "synth-lng"], "unknown synth preset 'synth-lng'", "synth-long")
    assert_user_error(capsys, ["data", "stats", "synth-long:users=0"], "users >= 1")


def test_train_and_eval(capsys, tmp_path, empty_csv, tiny_checkpoint):
    out = tmp_path / "m.ckpt"
    assert_user_error(capsys, ["train", "--dataset", empty_csv, "--out", out], "empty file")
    assert_user_error(capsys, ["train", "--dataset", tmp_path / "none.csv", "--out", out], "not found")
    assert_user_error(capsys, ["train", "--dataset", "synth-short:users=x", "--out", out], "bad synth override")
    assert_user_error(capsys, ["train", "--dataset", SYNTH, "--out", out, "--dim", "0"], "--dim", "at least 1")
    assert_user_error(capsys, ["train", "--dataset", SYNTH, "--out", out, "--dropout", "2"], "--dropout")
    assert_user_error(capsys, ["train", "--dataset", SYNTH, "--out", out, "--device", "gpu0"], "--device")
    assert_user_error(capsys, ["train", "--out", out], "--dataset")
    assert not out.exists()
    assert_user_error(capsys, ["eval-model", "--model", tmp_path / "none.ckpt", "--dataset", SYNTH],
                      "no model checkpoint", "kvrec train")
    assert_user_error(capsys, ["eval-model", "--model", empty_csv, "--dataset", SYNTH], "not a safetensors")
    assert_user_error(capsys, ["eval-model", "--model", tiny_checkpoint, "--dataset", SYNTH, "--history", "0"],
                      "--history")
    assert_user_error(capsys, ["eval-model", "--model", tiny_checkpoint, "--dataset", SYNTH],
                      "item ids", "differ")


def test_bench_offline(capsys, tmp_path, tiny_checkpoint):
    code, out, _ = run(capsys, "bench", "offline", "--policies", "list")  # as the README shows it
    assert code == 0 and "h2o [token]" in out and "kivi" in out
    common = ["bench", "offline", "--model", tiny_checkpoint, "--dataset", SYNTH, "--out", tmp_path / "o"]
    assert_user_error(capsys, [*common, "--policies", "full;h2x"], "unknown policy 'h2x'")
    assert_user_error(capsys, [*common, "--policies", "h2o:budgt=3"], "h2o", "budgt")
    assert_user_error(capsys, [*common, "--policies", "full;full"], "twice")
    assert_user_error(capsys, [*common, "--policies", " ; "], "no policies")
    assert_user_error(capsys, [*common, "--policies", "full", "--fraction", "1.5"], "--fraction")
    assert_user_error(capsys, ["bench", "offline", "--policies", "full"], "--model", "--policies list")
    assert not (tmp_path / "o").exists()


def test_bench_serve(capsys, tmp_path, tiny_checkpoint):
    base = ["bench", "serve", "--model", tiny_checkpoint]
    assert_user_error(capsys, [*base, "--policies", "full;int9"], "unknown policy 'int9'")
    assert_user_error(capsys, [*base, "--lengths", "100,zero"], "--lengths", "'zero'")
    assert_user_error(capsys, [*base, "--lengths", "0"], "--lengths", "at least 1")
    assert_user_error(capsys, ["bench", "serve", "--model", tmp_path / "none.ckpt"], "no model checkpoint")


def test_serve(capsys, tmp_path, tiny_checkpoint):
    assert_user_error(capsys, ["serve", "--model", tmp_path / "none.ckpt"], "no model checkpoint")
    assert_user_error(capsys, ["serve", "--model", tiny_checkpoint, "--policy", "kivi:bits=two"], "kivi", "bits")
    assert_user_error(capsys, ["serve", "--model", tiny_checkpoint, "--workers", "0"], "--workers")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_user_error(capsys, ["serve", "--model", tiny_checkpoint, "--port", port], f"port {port}",
                          "in use", "--port")


def test_sweep_checks_everything_before_it_starts(capsys, tmp_path, tiny_checkpoint, foreign_dataset):
    out = tmp_path / "sweep"
    base = ["sweep", "--model", tiny_checkpoint, "--dataset", SYNTH, "--out", out]
    assert_user_error(capsys, [*base, "--policies", "full;int8;h2o:budget=8;kivi:bitz=2"], "kivi", "bitz")
    assert_user_error(capsys, ["sweep", "--model", tmp_path / "none.ckpt", "--dataset", SYNTH, "--out", out],
                      "no model checkpoint")
    assert_user_error(capsys, ["sweep", "--model", tiny_checkpoint, "--dataset", tmp_path / "nope", "--out", out],
                      "not found")
    assert_user_error(capsys, ["sweep", "--model", tiny_checkpoint, "--dataset", foreign_dataset, "--out", out],
                      "none of the items", "trained on")
    assert_user_error(capsys, [*base, "--duration", "soon"], "--duration", "60s")
    assert_user_error(capsys, [*base, "--users", "0"], "--users")
    assert_user_error(capsys, [*base, "--prefix-fraction", "1"], "--prefix-fraction", "between 0 and 1")
    assert_user_error(capsys, ["sweep", "--model", tiny_checkpoint, "--out", out], "--dataset")
    assert not out.exists()  # nothing was started: the output folder is made only after the checks


def test_demo(capsys, tmp_path):
    assert_user_error(capsys, ["demo", "--out", tmp_path, "--duration", "0"], "--duration")


def test_a_real_bug_keeps_its_traceback(monkeypatch, capsys):
    from kvrec.models import cli as models_cli

    def broken(args):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(models_cli, "cmd_train", broken)
    with pytest.raises(KeyError):
        main(["train", "--dataset", SYNTH, "--out", "unused.ckpt"])


def all_parsers(parser: argparse.ArgumentParser, name: str = "kvrec"):
    """(command name, parser) for every parser of the CLI, nested subcommands included."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from all_parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_with_its_default():
    parser = build_parser()
    for name, sub in all_parsers(parser):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or not action.option_strings:
                continue
            where = f"{name} {action.option_strings[0]}"
            assert action.help, f"{where} has no help"
            shown = formatter._get_help_string(action) % {**vars(action), "prog": sub.prog}
            if action.required or "(required" in shown or isinstance(action, argparse._StoreTrueAction):
                continue  # nothing to default to; a flag is off unless given
            assert shown.count("default:") == 1, f"{where}: {shown!r}"
            assert "(default: None)" not in shown, where


def test_train_help_prints_the_device_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("cuda when available") == 1 and "None" not in out
    assert "--dim DIM embedding width (default: 64)" in out
