"""Records and the sweep report: metrics of one answer, files, summary rows, Pareto front, plots."""

from __future__ import annotations

import csv
import json
import math

import pytest
from kvrec.loadtest import report
from kvrec.loadtest.records import RecordWriter, ranking_metrics, read_records, record_of, unsent_record, worker_path


class FakeResponse:
    def __init__(self, status: int, body):
        self.status_code, self._body = status, body

    def json(self):
        if isinstance(self._body, Exception):
            raise self._body
        return self._body


CTX = {"user_id": "u1", "request": 3, "events": 2, "targets": ["b", "z"]}
BODY = {"user_id": "u1", "items": [{"item_id": i, "score": 1.0} for i in "abcdefghijkl"], "policy": "int8",
        "state": {"events_seen": 40, "tokens_kept": 80, "bytes": 4096, "source": "hit"},
        "timing_ms": {"total": 2.5}}


def test_ranking_metrics():
    assert ranking_metrics(["a", "b"], ["a"]) == (1.0, 1.0)
    hit, ndcg = ranking_metrics(list("abcdefghij"), ["b", "z"])  # one of two relevant items, at rank 2
    assert hit == 1.0
    assert ndcg == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ranking_metrics(list("abcdefghijk"), ["k"]) == (0.0, 0.0)  # 11th is outside the top 10


def test_record_of_a_good_a_failed_and_an_unreadable_response():
    rec = record_of(CTX, FakeResponse(200, BODY), 12.5, 1000.0, None)
    assert rec["ok"] and rec["policy"] == "int8" and rec["state_bytes"] == 4096 and rec["source"] == "hit"
    assert rec["top10"] == list("abcdefghij") and rec["hit@10"] == 1.0 and rec["server_ms"] == 2.5
    bad = record_of(CTX, FakeResponse(503, {"detail": "redis down"}), 3.0, 1000.0, RuntimeError("503"))
    assert not bad["ok"] and bad["status"] == 503 and "503" in bad["error"] and bad["ndcg@10"] is None
    garbled = record_of(CTX, FakeResponse(200, ValueError("not json")), 3.0, 1000.0, None)
    assert not garbled["ok"] and "unreadable" in garbled["error"]
    last = record_of({**CTX, "targets": []}, FakeResponse(200, BODY), 1.0, 1000.0, None)
    assert last["ok"] and last["hit@10"] is None  # a stream's last request is not scored


def test_records_round_trip_including_distributed_workers(tmp_path):
    path = tmp_path / "recs.jsonl"
    for target, n in ((path, 2), (worker_path(path, 0), 3), (worker_path(path, 1), 1)):
        w = RecordWriter(target)
        for i in range(n):
            w.write({"i": i, "file": target.name})
        w.close()
    assert worker_path(path, 1).name == "recs.worker1.jsonl"
    assert len(read_records(path)) == 6


def recs(policy_offset: float, n: int = 20, top=None) -> list[dict]:
    return [{"t": 100.0 + i * 0.5, "latency_ms": 10.0 + i + policy_offset, "ok": True, "user_id": f"u{i % 4}",
             "request": i // 4, "top10": top or list("abcdefghij"), "ndcg@10": 0.5, "hit@10": 1.0}
            for i in range(n)]


def test_summary_row_has_exactly_the_keys_and_derived_numbers():
    metrics = {"state": {"bytes_per_user_mean": 2048.0, "compression_ratio": 4.0}}
    reference = recs(0, top=list("abcdeklmno"))
    row = report.summary_row("int8", recs(0), metrics, redis_used_memory=10_000, reference=reference)
    assert tuple(row) == report.SUMMARY_KEYS
    assert row["projected_bytes_1e9_users"] == 2048.0 * 1e9
    assert row["top10_overlap"] == 0.5
    assert row["rps"] == pytest.approx(20 / (9.5 + 0.029))  # 20 requests from t=100 to the last one's end
    assert row["p50_ms"] == pytest.approx(19.5)
    assert row["ndcg@10"] == 0.5 and row["hr@10"] == 1.0
    assert row["ndcg@10_vs_full"] == 0.0 and row["ndcg@10_vs_full_ci95"] == [0.0, 0.0]  # the same answers
    empty = report.summary_row("x", [], {}, None, None)
    assert empty["rps"] is None and empty["bytes_per_user_mean"] is None and empty["ndcg@10_vs_full"] is None


def test_accuracy_against_full_is_paired_on_the_same_requests_with_an_interval():
    """A policy that answers full's requests 20% worse, and more requests of its own that are easy: the
    paired difference is -20% (its extra requests have no partner), with an interval around it, and the
    markdown shows both; the mode column says how the service ranked."""
    full = [dict(r, **{"ndcg@10": 0.25 + 0.05 * (i % 4)}, mode="ranking") for i, r in enumerate(recs(0))]
    worse = [dict(r, **{"ndcg@10": 0.8 * r["ndcg@10"]}) for r in full]
    extra = [dict(r, request=100 + r["request"], **{"ndcg@10": 1.0}) for r in full]
    row = report.summary_row("h2o", worse + extra, {}, None, reference=full)
    assert row["ndcg@10_vs_full"] == pytest.approx(-0.2)
    low, high = row["ndcg@10_vs_full_ci95"]
    assert low == pytest.approx(-0.2) and high == pytest.approx(-0.2)  # the same loss for every user
    noisy = [dict(r, **{"ndcg@10": r["ndcg@10"] * (0.6 if r["user_id"] in ("u0", "u1") else 1.0)}) for r in full]
    low, high = report.summary_row("knorm", noisy, {}, None, reference=full)["ndcg@10_vs_full_ci95"]
    assert low < -0.3 and -0.1 < high <= 0.0  # half the users lose 40%, 4 users: a wide interval
    assert row["mode"] == "ranking"
    table = report.markdown_table([row])
    assert "-20.0%" in table and "[-20.0%, -20.0%]" in table and "ranking" in table


def test_pareto_front_on_hand_made_rows():
    rows = [
        {"policy": "full", "bytes_per_user_mean": 1000, "ndcg@10": 0.30},
        {"policy": "int8", "bytes_per_user_mean": 260, "ndcg@10": 0.30},  # dominates full
        {"policy": "kivi", "bytes_per_user_mean": 80, "ndcg@10": 0.28},
        {"policy": "h2o", "bytes_per_user_mean": 100, "ndcg@10": 0.20},  # dominated by kivi
        {"policy": "window", "bytes_per_user_mean": 30, "ndcg@10": 0.10},
        {"policy": "recompute", "bytes_per_user_mean": 0, "ndcg@10": 0.30},  # no state: not on this plane
        {"policy": "broken", "bytes_per_user_mean": None, "ndcg@10": 0.9},
    ]
    assert report.pareto_front(rows) == ["window", "kivi", "int8"]


def test_write_report_writes_every_file_and_plot(tmp_path):
    rows, records = [], {}
    for i, (policy, per_user) in enumerate((("full", 4096.0), ("kivi:bits=2", 512.0), ("recompute", 0.0))):
        records[policy] = recs(i * 5)
        rows.append(report.summary_row(policy, records[policy], {"state": {"bytes_per_user_mean": per_user}},
                                       1000, records["full"]))
    plots = report.write_report(tmp_path, rows, records, "test sweep", ["details line"])
    assert json.loads((tmp_path / "summary.json").read_text()) == rows
    with open(tmp_path / "summary.csv") as f:
        assert [r["policy"] for r in csv.DictReader(f)] == ["full", "kivi:bits=2", "recompute"]
    md = (tmp_path / "report.md").read_text()
    assert "| kivi:bits=2 * |" in md and "| recompute |" in md and "top10_overlap" in md
    for p in plots:
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
    assert {p.name for p in plots} == {"bytes_vs_ndcg.png", "throughput_vs_bytes.png", "latency_cdf.png"}


def test_accuracy_on_common_requests_removes_the_coverage_bias():
    fast = recs(0, n=8)
    for r in fast[4:]:  # a faster policy reached later, harder requests too
        r["ndcg@10"], r["hit@10"] = 0.0, 0.0
    slow = recs(0, n=4)
    common = report.scored_keys(fast) & report.scored_keys(slow)
    assert report.summary_row("fast", fast, {}, None, None)["ndcg@10"] == 0.25
    assert report.summary_row("fast", fast, {}, None, None, common)["ndcg@10"] == 0.5


def test_open_loop_records_measure_from_the_intended_time_and_unsent_ones_count(tmp_path):
    """An open-loop record's latency includes how late it left; a request never answered by the end
    keeps the time it waited in the percentiles and counts as an error, so no queue is hidden."""
    sent = record_of({**CTX, "intended_t": 999.9}, FakeResponse(200, BODY), 12.5, 1000.0, None)
    assert sent["send_lag_ms"] == pytest.approx(100.0) and sent["response_ms"] == 12.5
    assert sent["latency_ms"] == pytest.approx(112.5) and sent["ok"] and not sent["unsent"]
    closed = record_of(CTX, FakeResponse(200, BODY), 12.5, 1000.0, None)
    assert closed["latency_ms"] == 12.5 and closed["intended_t"] is None
    never = unsent_record(1000.0, 1002.0, "still waiting")
    assert never["unsent"] and not never["ok"] and never["latency_ms"] == pytest.approx(2000.0)
    assert "not answered: still waiting" in never["error"]
    stats = report.client_stats([sent, never])
    assert (stats["errors"], stats["unsent"], stats["late"]) == (1, 1, 1)
    assert stats["p99_ms"] > 1900  # the unsent request's wait is in the percentile


def test_open_loop_and_capacity_columns_appear_only_where_measured(tmp_path):
    records = recs(0)
    closed = report.summary_row("full", records, {}, None, None)
    opened = report.summary_row("full", records, {}, None, None, offered_rps=40.0,
                                capacity=(report.capacity_key(50), report.CapacityBound(400.0, ">=")))
    assert tuple(closed) == report.SUMMARY_KEYS
    cols = list(opened)
    assert cols.index("capacity_rps@p99<=50ms") == cols.index("rps") - 1
    assert cols[cols.index("p99_ms") + 1: cols.index("p99_ms") + 4] == ["offered_rps", "late", "unsent"]
    assert opened["offered_rps"] == 40.0 and opened["unsent"] == 0
    table = report.markdown_table([opened])
    assert "capacity_rps@p99<=50ms" in table.splitlines()[0] and "| >=400.0 |" in table
    report.write_summary(tmp_path, [opened])
    with open(tmp_path / "summary.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["capacity_rps@p99<=50ms"]) == 400.0 and row["offered_rps"] == "40.0"
    assert json.loads((tmp_path / "summary.json").read_text())[0]["capacity_rps@p99<=50ms"] == 400.0
