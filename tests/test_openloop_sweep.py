"""`kvrec sweep --find-capacity` end to end: a tiny untrained checkpoint, a real `kvrec serve` on a private
Redis, open-loop Locust steps, and the capacity column in every file of the report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SWEEP_DATASET
from kvrec.loadtest import report
from kvrec.loadtest.options import ReplayOptions
from kvrec.loadtest.records import read_records
from kvrec.loadtest.sweep import CapacitySearch, SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parents[1]



@pytest.mark.slow
@pytest.mark.redis
def test_find_capacity_reports_each_policy_s_rate_at_the_p99_target(sweep_model, tmp_path):
    out = tmp_path / "sweep"
    lines: list[str] = []
    search = CapacitySearch(p99_ms=50, min_rate=4, max_rate=16, max_steps=3, step_s=2)
    rows = run_sweep(SweepConfig(model=sweep_model, policies=["full"], out=out, capacity=search, drain_s=3,
                                 replay=ReplayOptions(dataset=SWEEP_DATASET)), echo=lines.append)
    key = "capacity_rps@p99<=50ms"
    (row,) = rows
    run = json.loads((out / "run.json").read_text())
    found = run["policies"][0]["capacity"]
    steps = found["steps"]
    assert 1 <= len(steps) <= 3 and steps[0]["rate"] == 4  # doubling starts at --min-rate
    assert row[key] == found["rate"] and 4 <= found["rate"] <= 16 and row["offered_rps"] == found["rate"]
    chosen = next(s for s in steps if s["rate"] == found["rate"])
    assert chosen["sustained"] == (found["bound"] != "<")
    # every step ran, from the warm-up, as an open loop; the row is the chosen step's records
    step_dirs = sorted((out / "policies" / "01-full" / "steps").iterdir())
    assert len(step_dirs) == len(steps)
    for step, sdir in zip(steps, step_dirs):
        recs = read_records(sdir / "records.jsonl")
        assert recs and all(r["intended_t"] is not None for r in recs)
        assert all(r["source"] == "hit" for r in recs if r["request"] == 0 and r["ok"])  # warmed up again
        assert abs(len(recs) - step["rate"] * 2) <= step["rate"]  # ~rate x 2 s were due
    assert report.client_stats(read_records(out / "policies" / "01-full" / "records.jsonl"))["p99_ms"] == \
        pytest.approx(chosen["p99_ms"])
    assert sum("req/s -> p99" in line for line in lines) == len(steps)  # a progress line per step
    # the column in every file
    assert json.loads((out / "summary.json").read_text())[0][key] == row[key]
    with open(out / "summary.csv") as f:
        assert float(next(csv.DictReader(f))[key]) == row[key]
    md = (out / "report.md").read_text()
    assert key in md and "capacity search at p99 <= 50 ms" in md and "--find-capacity" in md


def test_sweep_capacity_flags_and_their_user_errors():
    from kvrec.cli import build_parser

    args = build_parser().parse_args(["sweep", "--model", "m", "--out", "o", "--dataset", "d", "--find-capacity",
                                      "--p99-ms", "25", "--min-rate", "2", "--max-rate", "64", "--step-duration",
                                      "5s", "--capacity-steps", "4", "--locust-workers", "2", "--arrivals",
                                      "poisson", "--redis-cluster", "3"])
    assert (args.find_capacity, args.p99_ms, args.min_rate, args.max_rate, args.step_duration) == (True, 25, 2, 64, 5)
    assert (args.capacity_steps, args.locust_workers, args.arrivals, args.redis_cluster) == (4, 2, "poisson", 3)
    for bad, message in ((["--min-rate", "10", "--max-rate", "5"], "--min-rate 10 is above --max-rate 5"),
                         (["--redis-cluster", "3", "--redis-url", "redis://127.0.0.1:1/0"], "--redis-cluster starts")):
        proc = subprocess.run([sys.executable, "-m", "kvrec.cli", "sweep", "--model", "m", "--out", "o", "--dataset",
                               "d", *bad], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
