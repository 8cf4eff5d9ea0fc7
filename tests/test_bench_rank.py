"""`kvrec bench rank`: the grid of lengths x candidate counts x modes, its JSON keys, its refusals."""

from __future__ import annotations

import json

from kvrec.cli import main


def test_bench_rank_writes_every_cell_with_the_documented_keys(tmp_path, capsys):
    out = tmp_path / "rank.json"
    assert main(["bench", "rank", "--lengths", "20,40", "--candidates", "3,8", "--repeats", "1",
                 "--per-candidate-sample", "2", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cells = {(r["length"], r["candidates"], r["mode"]) for r in rows}
    assert cells == {(t, c, m) for t in (20, 40) for c in (3, 8) for m in ("cached", "recompute", "per_candidate")}
    for r in rows:
        assert {"length", "candidates", "mode", "ms_per_request", "candidates_per_s"} <= r.keys()
        assert r["ms_per_request"] > 0
        assert abs(r["candidates_per_s"] - r["candidates"] / r["ms_per_request"] * 1e3) < 1e-6 * r["candidates_per_s"]
        # per_candidate times a sample of the candidates and says so; the batched modes time them all
        sampled = min(2, r["candidates"]) if r["mode"] == "per_candidate" else r["candidates"]
        assert r["measured_candidates"] == sampled
    assert "per_candidate" in capsys.readouterr().out


def test_bench_rank_refuses_a_model_without_a_ranking_head_and_unknown_modes(tiny_checkpoint, capsys):
    assert main(["bench", "rank", "--model", str(tiny_checkpoint), "--lengths", "5", "--candidates", "2"]) == 2
    assert "no ranking head" in capsys.readouterr().err
    assert main(["bench", "rank", "--modes", "cached,batched", "--lengths", "5", "--candidates", "2"]) == 2
    assert "unknown --modes batched" in capsys.readouterr().err
