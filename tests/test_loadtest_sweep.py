"""`kvrec sweep` end to end: a tiny untrained checkpoint, real `kvrec serve` subprocesses on a private
Redis, a real headless Locust run per policy, and the report they produce."""

from __future__ import annotations

import json

import pytest
from conftest import SWEEP_DATASET
from kvrec.loadtest import report
from kvrec.loadtest.options import ReplayOptions
from kvrec.loadtest.records import read_records
from kvrec.loadtest.sweep import SweepConfig, SweepError, run_sweep


@pytest.mark.slow
@pytest.mark.redis
def test_sweep_two_policies_end_to_end(sweep_model, tmp_path):
    out = tmp_path / "sweep"
    lines = []
    rows = run_sweep(SweepConfig(model=sweep_model, policies=["full", "int8"], out=out, users=2, spawn_rate=2,
                                 duration_s=6, replay=ReplayOptions(dataset=SWEEP_DATASET)), echo=lines.append)
    assert [r["policy"] for r in rows] == ["full", "int8"]
    assert sum(line.startswith(("[1/2] full", "[2/2] int8")) for line in lines) == 2  # a progress line each
    saved = json.loads((out / "summary.json").read_text())
    assert saved == rows and all(tuple(r) == report.SUMMARY_KEYS for r in saved)
    full, int8 = rows
    assert full["top10_overlap"] == 1.0 and int8["top10_overlap"] > 0.5
    assert 0 < int8["bytes_per_user_mean"] < full["bytes_per_user_mean"]
    assert full["redis_used_memory"] > 0 and full["rps"] > 0 and full["p99_ms"] >= full["p50_ms"] > 0
    assert full["ndcg@10"] is not None and full["hr@10"] is not None

    for policy, sub in (("full", "01-full"), ("int8", "02-int8")):
        records = read_records(out / "policies" / sub / "records.jsonl")
        assert records and all(r["ok"] and r["policy"] == policy for r in records)
        by_user: dict[str, list[int]] = {}
        for r in sorted(records, key=lambda r: r["t"]):
            by_user.setdefault(r["user_id"], []).append(r["request"])
        assert all(reqs == list(range(len(reqs))) for reqs in by_user.values())  # in order, none twice
        first = [r for r in records if r["request"] == 0]
        assert all(r["source"] == "hit" for r in first)  # warm-up built the states before the run
        metrics = json.loads((out / "policies" / sub / "metrics.json").read_text())
        assert metrics["policy"] == policy and metrics["state"]["users"] > 0

    run = json.loads((out / "run.json").read_text())
    assert run["versions"]["locust"] and run["machine"]["cpus"] and run["config"]["policies"] == ["full", "int8"]
    for name in ("summary.csv", "report.md", "bytes_vs_ndcg.png", "throughput_vs_bytes.png", "latency_cdf.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.redis
def test_a_policy_whose_run_fails_is_reported_not_hidden(sweep_model, tmp_path):
    """A failure after the start (here Locust refusing an argument) costs that policy, not the report."""
    with pytest.raises(SweepError, match="1 of 1 policies failed: full"):
        run_sweep(SweepConfig(model=sweep_model, policies=["full"], out=tmp_path, duration_s=1,
                              replay=ReplayOptions(dataset=SWEEP_DATASET), extra_locust_args=["--no-such-flag"]),
                  echo=lambda line: None)
    run = json.loads((tmp_path / "run.json").read_text())
    assert "Locust exited with code" in run["policies"][0]["error"]
    assert json.loads((tmp_path / "summary.json").read_text()) == []
