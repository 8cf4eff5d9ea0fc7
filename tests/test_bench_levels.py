"""`kvrec bench levels`: several models (a base and stand-ins for trained levels) under post-hoc policies,
every row on the same requests and compared with the base model's `full` request by request.

The stand-ins are untrained tiny models built here: the base HSTU, a narrower HSTU (one head: a smaller
K/V per event, as a head-level variant keeps), ASTRO (whose partitioned state `kivi` does not apply to) and
the base once more (a model compared with itself). Growth is measured at 200 and 2,000 events instead of
1,000 and 10,000 (the same tenfold, a fraction of the time)."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from kvrec.compression.bench_levels import growth_stream, labels_of, targets_met
from kvrec.compression.report import pareto_front
from kvrec.models.checkpoint import save_checkpoint
from kvrec.models.data import load_dataset
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model

from kvrec.cli import main

DATASET = "synth-short:users=12,mean_len=60,items=30"  # a small catalogue: untrained models still hit
POLICIES = "int8;kivi:bits=2,residual=8;window:budget=16"
KIVI = "kivi:bits=2,residual=8,group=32"  # as the spec prints itself, skipped or not


def make(path, dataset_fingerprint: str | None = None, **config):
    ds = load_dataset(DATASET)
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=ds.num_items, dim=16, d_k=8, d_v=8, dropout=0.0,
                                    **{"kind": "hstu", "heads": 2, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)  # position and time matter, so evicting tokens changes answers
    save_checkpoint(path, model, ds.item_ids, dataset_fingerprint or ds.fingerprint())
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("levels")
    return {"base": make(folder / "base.ckpt"), "narrow": make(folder / "narrow.ckpt", heads=1),
            "astro": make(folder / "astro.ckpt", kind="astro"),
            "foreign": make(folder / "foreign.ckpt", dataset_fingerprint="another-dataset")}


def levels_argv(models, out, *paths, policies=POLICIES):
    return ["bench", "levels", "--models", ",".join(str(models[p]) for p in paths), "--dataset", DATASET,
            "--policies", policies, "--out", str(out), "--events-per-request", "5", "--max-users", "6",
            "--max-requests-per-user", "3", "--lengths", "200,2000", "--growth-request", "100", "--threads", "1"]


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    """One CLI run over base, narrow, astro and base again; its output folder and printed table."""
    out = tmp_path_factory.mktemp("levels-out")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    printed = io.StringIO()
    capture.setattr(sys, "stdout", printed)
    capture.setattr(sys, "stderr", io.StringIO())  # the progress bars
    try:
        assert main(levels_argv(models, out, "base", "narrow", "astro", "base")) == 0
    finally:
        capture.undo()
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def rows(run):
    return {(r["model"], r["policy"]): r for r in json.loads((run[0] / "results.json").read_text())}


def test_every_model_runs_full_and_each_spec_in_order(rows):
    assert [key for key in rows] == [(m, p) for m in ("base", "narrow", "astro", "base#2")
                                     for p in ("full", "int8", KIVI, "window:budget=16")]
    assert {r["variant"] for r in rows.values()} == {"base"}  # stand-ins: no trained level in their configs
    assert rows["base", "full"]["level"] == "reference" and rows["base", "int8"]["level"] == "post-hoc"
    assert rows["narrow", "full"]["level"] == "trained" and rows["astro", "int8"]["level"] == "trained+post-hoc"
    assert rows["base#2", "full"]["level"] == "reference"  # the same weights: not a trained level


def test_rows_are_paired_with_the_base_full(rows):
    """The base's `full` against itself, and the same model loaded again, differ by exactly 0 with a
    zero-width interval; the same requests (negatives included: GAUC is equal) answered by every row."""
    for model in ("base", "base#2"):
        full = rows[model, "full"]
        assert full["ndcg@10_vs_base"] == 0.0 and full["ndcg@10_vs_base_ci95"] == [0.0, 0.0]
        assert full["ndcg@10_vs_base_se"] == 0.0
    base = rows["base", "full"]
    assert base["ndcg@10"] > 0  # else every relative difference below is undefined
    for (model, policy), row in rows.items():
        if row["skipped"]:
            continue
        assert row["requests"] == base["requests"] and row["users"] == base["users"]
        assert row["ndcg@10_vs_base"] == pytest.approx(row["ndcg@10"] / base["ndcg@10"] - 1, abs=1e-12)
        low, high = row["ndcg@10_vs_base_ci95"]
        assert low <= row["ndcg@10_vs_base"] <= high and row["ndcg@10_vs_base_se"] >= 0
        if model.startswith("base"):  # the base model: its own full is the base
            assert row["ndcg@10_vs_base"] == row["ndcg@10_vs_full"]
            twin = rows["base#2" if model == "base" else "base", policy]
            for key in ("ndcg@10", "gauc", "recall@10", "bytes_per_user_mean", "ndcg@10_vs_base"):
                assert row[key] == twin[key], (model, policy, key)
    # a different model answers differently, and its interval comes from users who disagree
    assert rows["narrow", "full"]["ndcg@10_vs_base"] != 0.0 or rows["astro", "full"]["ndcg@10_vs_base"] != 0.0


def test_a_spec_that_does_not_apply_is_skipped_with_a_note(rows):
    skipped = [key for key, row in rows.items() if row["skipped"]]
    assert skipped == [("astro", KIVI)]
    note = rows["astro", KIVI]["note"]
    assert note.startswith("skipped:") and "kivi" in note and "partitioned-kv" in note
    assert rows["astro", KIVI].get("ndcg@10") is None
    for key in (("base", KIVI), ("narrow", KIVI), ("astro", "int8"), ("astro", "window:budget=16")):
        assert rows[key]["ndcg@10"] is not None and rows[key]["note"] == "", key


def test_state_sizes_measured_by_growing_a_state(rows):
    """K/V under `full` grows linearly (tenfold events, about tenfold bytes: only the header and the last
    hidden vector are fixed); a token budget keeps the blob flat; a narrower model's K/V is smaller."""
    for model in ("base", "narrow", "astro"):
        full = rows[model, "full"]
        assert 9.0 < full["bytes_at_2000"] / full["bytes_at_200"] <= 10.0, model
        window = rows[model, "window:budget=16"]
        assert window["bytes_at_2000"] == pytest.approx(window["bytes_at_200"], rel=0.02), model
        assert window["compression_ratio_at_2000"] > 10 * window["compression_ratio"]
    base, narrow = rows["base", "full"], rows["narrow", "full"]
    assert base["compression_ratio"] == base["compression_ratio_at_2000"] == 1.0
    assert narrow["bytes_at_2000"] < 0.6 * base["bytes_at_2000"]
    assert narrow["compression_ratio_at_2000"] == pytest.approx(base["bytes_at_2000"] / narrow["bytes_at_2000"])
    assert narrow["compression_ratio"] == pytest.approx(base["bytes_per_user_mean"] / narrow["bytes_per_user_mean"])


def test_the_growth_stream_keeps_time_moving():
    from kvrec.compression.bench import replay_streams

    streams = replay_streams(load_dataset(DATASET), 5, None)
    events = growth_stream(streams, 2000)
    assert len(events) == 2000 and bool((events.ts[1:] >= events.ts[:-1]).all())


def test_outputs_and_columns(run, rows):
    out, printed = run
    header = next(csv.reader(open(out / "results.csv")))
    for column in ("model", "variant", "policy", "bytes_per_user_mean", "bytes_at_200", "bytes_at_2000",
                   "compression_ratio", "compression_ratio_at_2000", "ndcg@10", "ndcg@10_vs_base",
                   "ndcg@10_vs_base_se", "ndcg@10_vs_base_ci95", "macs_per_request", "ms_per_request", "target",
                   "note"):
        assert column in header, column
    table = (out / "results.md").read_text()
    for column in ("| model | variant | policy | bytes/user | @200 events | @2,000 events | ratio | ratio @2,000 |",
                   "vs base [95% CI]", "s.e.", "MACs/req", "ms/req", "target", "bootstrap over users"):
        assert column in table, column
    assert "| base | base | `full` |" in table and "KiB" in table and "skipped: kivi" in table
    assert "| base | base | `full` |" in printed
    assert (out / "pareto.png").stat().st_size > 10_000


def test_targets_need_the_ratio_and_the_intervals_lower_bound():
    def row(ratio, rel, low):
        return {"compression_ratio": ratio, "ndcg@10_vs_base": rel, "ndcg@10_vs_base_ci95": [low, rel + 0.01]}

    assert targets_met(row(8.0, 0.0, -0.01)) == "8x@1%"
    assert targets_met(row(10.0, -0.001, -0.02)) == ""  # the point is within 1%, the interval is not
    assert targets_met(row(7.9, 0.0, 0.0)) == ""
    assert targets_met(row(40.0, -0.02, -0.04)) == "32x@5%"
    assert targets_met(row(40.0, 0.0, -0.005)) == "8x@1% 32x@5%"
    assert targets_met({"compression_ratio": None, "ndcg@10_vs_base_ci95": None}) == ""


def test_pareto_front_and_labels():
    points = [(100.0, -0.5), (50.0, -3.0), (200.0, 0.0), (60.0, -4.0), (150.0, -1.0), (50.0, -3.5)]
    assert pareto_front(points) == [1, 0, 2]
    assert labels_of(["a/base.ckpt", "b/gqa2.ckpt", "c/base.ckpt"]) == ["base", "gqa2", "base#2"]


def test_models_trained_on_different_datasets_are_refused(models, tmp_path, capsys):
    code = main(levels_argv(models, tmp_path / "o", "base", "foreign"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("kvrec bench levels: error:") and "foreign" in err[0] and "same dataset" in err[0]
    assert not (tmp_path / "o").exists()


def test_cli_help_and_bad_flags(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "levels", "--help"])
    assert exc.value.code == 0 and "--models" in capsys.readouterr().out
    for argv, word in ((["--lengths", "0"], "--lengths"), (["--growth-request", "x"], "--growth-request"),
                       (["--fraction", "1"], "--fraction")):
        with pytest.raises(SystemExit) as exc:
            main([*levels_argv(models, tmp_path / "o", "base"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and word in err[0], err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "levels", "--dataset", DATASET, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "--models" in err[0]
    assert main(levels_argv(models, tmp_path / "o", "base", policies="full;h2x")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown policy 'h2x'" in err[0]
    assert not (tmp_path / "o").exists()
