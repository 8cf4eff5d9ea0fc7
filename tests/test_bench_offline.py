"""The offline benchmark: the replay follows the server's path, `full` equals `recompute`, files appear."""

from __future__ import annotations

import json

import pytest
import torch
from kvrec.compression.bench import run_offline
from kvrec.models.checkpoint import load_checkpoint, save_checkpoint
from kvrec.models.data import load_dataset, stream_split
from kvrec.models.recommender import ModelConfig
from kvrec.models.registry import build_model
from kvrec.models.state import Events

from kvrec.cli import main

DATASET = "synth-short:users=12,mean_len=60"
SPECS = ["full", "recompute", "window:budget=16", "h2o:budget=16,recent=4+int8", "kivi:bits=2,residual=8,group=8",
         "svd:rank=4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    ds = load_dataset(DATASET)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="hstu", num_items=ds.num_items, dim=16, heads=2, d_k=8, d_v=8,
                                    dropout=0.0)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    save_checkpoint(path, model, ds.item_ids, ds.fingerprint())
    return load_checkpoint(path)


@pytest.fixture(scope="module")
def rows(checkpoint):
    streams = stream_split(load_dataset(DATASET), min_future=6)
    result = run_offline(checkpoint, streams, SPECS, events_per_request=5, max_users=6, max_requests_per_user=3,
                         progress=False)
    return {r["policy"]: r for r in result}


def test_full_equals_recompute_in_every_accuracy_metric(rows):
    full, recompute = rows["full"], rows["recompute"]
    for metric in ("ndcg@10", "hr@10", "gauc", "recall@10", "top10_overlap"):
        assert full[metric] == pytest.approx(recompute[metric], abs=1e-9), metric
    assert recompute["score_mae"] < 1e-5 and full["score_mae"] == 0.0
    assert recompute["bytes_per_user_mean"] == 0 and recompute["compression_ratio"] is None
    assert recompute["macs_per_request"] > full["macs_per_request"]


def test_rows_have_the_reported_keys_and_compression_shows(rows):
    keys = {"policy", "ndcg@10", "hr@10", "gauc", "recall@10", "top10_overlap", "bytes_per_user_mean",
            "bytes_per_user_p99", "compression_ratio", "macs_per_request", "ms_per_request"}
    assert list(rows) == ["full", "recompute", "window:budget=16", "h2o:budget=16,recent=4+int8",
                          "kivi:bits=2,residual=8,group=8", "svd:rank=4,dtype=fp32"]
    for row in rows.values():
        assert keys <= set(row) and row["requests"] > 0
    assert rows["full"]["compression_ratio"] == pytest.approx(1.0)
    assert rows["h2o:budget=16,recent=4+int8"]["compression_ratio"] > rows["window:budget=16"]["compression_ratio"] > 1
    assert rows["window:budget=16"]["macs_per_request"] < rows["full"]["macs_per_request"]


def test_svd_bases_are_saved_beside_the_checkpoint(rows, checkpoint):
    assert checkpoint.path.with_name(checkpoint.path.name + ".svd.safetensors").is_file()


def test_macs_count_each_query_against_every_key_it_sees():
    """Extending T cached tokens by n events costs layers x heads x n x (T + n) x (d_k + d_v) MACs; a
    recompute of the same history costs the causal pairs of every prefill chunk."""
    cfg = ModelConfig(num_items=20, layers=2, heads=2, d_k=8, d_v=4, dropout=0.0)
    model = build_model(cfg).eval()
    events = Events.of(torch.arange(13) % 20)
    state, _, stats = model.prefill(events[:10], chunk=4)
    assert stats.macs == 2 * 2 * (4 * 4 + 4 * 8 + 2 * 10) * 12  # chunks of 4, 4 and 2 queries
    _, _, stats = model.extend(state, events[10:])
    assert stats.macs == 2 * 2 * 3 * 13 * 12


def test_cli_writes_results(checkpoint, tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "offline", "--model", str(checkpoint.path), "--dataset", DATASET, "--policies",
                 "full;recompute;streaming:sink=2,window=10+fp16", "--out", str(out), "--events-per-request", "5",
                 "--max-users", "3", "--max-requests-per-user", "2"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in rows] == ["full", "recompute", "streaming:sink=2,window=10+fp16"]
    assert (out / "results.csv").read_text().startswith("policy,ndcg@10")
    assert "| `full` |" in (out / "results.md").read_text()
    assert (out / "pareto.png").stat().st_size > 1000


def test_cli_rejects_a_bad_policy_before_loading(tmp_path, capsys):
    assert main(["bench", "offline", "--model", "nope.ckpt", "--dataset", DATASET, "--policies", "h2o:budgt=3",
                 "--out", str(tmp_path)]) == 2
    assert "valid: budget" in capsys.readouterr().err
