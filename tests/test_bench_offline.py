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
                          "kivi:bits=2,residual=8,group=8", "svd:rank=4,dtype=fp32,groups=1"]
    for row in rows.values():
        assert keys <= set(row) and row["requests"] > 0
    assert rows["full"]["compression_ratio"] == pytest.approx(1.0)
    assert rows["h2o:budget=16,recent=4+int8"]["compression_ratio"] > rows["window:budget=16"]["compression_ratio"] > 1
    assert rows["window:budget=16"]["macs_per_request"] < rows["full"]["macs_per_request"]


def test_svd_binds_from_the_weights_alone(rows, checkpoint):
    """`svd` is Palu: its bases come from the model's projection weights, so the replay fits and saves
    nothing beside the checkpoint, and the stored latents are smaller than the keys and values."""
    assert sorted(p.name for p in checkpoint.path.parent.iterdir()) == ["tiny.ckpt"]
    assert rows["svd:rank=4,dtype=fp32,groups=1"]["compression_ratio"] > 1


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


# ------------------------------------------------------------------------------------------ ranking head


@pytest.fixture(scope="module")
def ranking_checkpoint(tmp_path_factory):
    """An untrained model with a ranking head whose checkpoint records actions 3 and 4 as engagement."""
    ds = load_dataset(DATASET)
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="hstu", num_items=ds.num_items, dim=16, heads=2, d_k=8, d_v=8,
                                    dropout=0.0, ranking_head=True)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_(0, 0.5)  # position and time matter, so dropping tokens changes scores
    path = tmp_path_factory.mktemp("ckpt") / "ranking.ckpt"
    save_checkpoint(path, model, ds.item_ids, ds.fingerprint(), {"task": "ranking", "engagement_actions": [3, 4]})
    return load_checkpoint(path)


def streams_with_actions():
    """synth-short's streams with random actions 1..4, so the next item has an engagement label."""
    gen = torch.Generator().manual_seed(0)
    out = stream_split(load_dataset(DATASET), min_future=6)
    for s in out:
        s.prefix = Events(s.prefix.items, s.prefix.ts, torch.randint(1, 5, (len(s.prefix),), generator=gen))
        s.future = Events(s.future.items, s.future.ts, torch.randint(1, 5, (len(s.future),), generator=gen))
    return out


RANK_SPECS = ["full", "recompute", "window:budget=8", "int8"]


@pytest.fixture(scope="module")
def ranking_rows(ranking_checkpoint):
    result = run_offline(ranking_checkpoint, streams_with_actions(), RANK_SPECS, events_per_request=5, max_users=6,
                         max_requests_per_user=3, progress=False, rank_candidates=30)
    return {r["policy"]: r for r in result}


def test_a_ranking_model_reports_ranking_accuracy_per_policy(ranking_rows):
    for row in ranking_rows.values():
        for key in ("rank_ndcg@10", "rank_hr@10", "rank_retrieval_ndcg@10", "rank_retrieval_hr@10", "engage_auc",
                    "engage_gauc"):
            assert row[key] is not None and 0.0 <= row[key] <= 1.0, (row["policy"], key)
    full, recompute = ranking_rows["full"], ranking_rows["recompute"]
    for key in ("rank_ndcg@10", "rank_hr@10", "rank_retrieval_ndcg@10", "engage_auc", "engage_gauc"):
        assert full[key] == pytest.approx(recompute[key], abs=1e-9), key
    assert all(row["ms_rank"] > 0 for row in ranking_rows.values())


def test_candidates_are_ranked_over_the_state_each_policy_left(ranking_checkpoint, monkeypatch):
    """The ranking head must see what the policy kept (so its loss shows), not the uncompressed history:
    under `window:budget=8` every ranked state holds at most 8 tokens, under `full` the whole history."""
    from kvrec.compression.step import ServingStep

    kept: dict[str, list[int]] = {}
    original = ServingStep.rank

    def spy(self, state, candidates, ts, batch=256):
        kept.setdefault(self.pipeline.spec, []).append(state.tokens_kept())
        assert int(candidates[0]) not in candidates[1:].tolist()  # the true item once, first
        return original(self, state, candidates, ts, batch)

    monkeypatch.setattr(ServingStep, "rank", spy)
    streams = streams_with_actions()
    run_offline(ranking_checkpoint, streams, ["full", "window:budget=8"], events_per_request=5, max_users=3,
                max_requests_per_user=2, progress=False, rank_candidates=30)
    assert max(kept["window:budget=8"]) <= 8 * 2  # 2 layers x 8 tokens
    assert min(kept["full"]) > 8 * 2
    assert len(kept["full"]) == len(kept["window:budget=8"]) == 6


def test_a_retrieval_model_has_no_ranking_columns(rows, ranking_rows):
    from kvrec.compression.report import markdown_table

    assert all(r["rank_ndcg@10"] is None and r["engage_auc"] is None and r["ms_rank"] is None for r in rows.values())
    assert "rank NDCG@10" not in markdown_table(list(rows.values()))
    table = markdown_table(list(ranking_rows.values()))
    assert "rank NDCG@10" in table and "| `window:budget=8` |" in table


def test_every_accuracy_comes_with_its_paired_difference_to_full(rows, ranking_rows):
    """`ndcg@10_vs_full` is the relative difference of the mean NDCG@10 on the same requests, and its
    interval holds it; full against itself is exactly 0, and so is recompute (the same answers)."""
    for table, keys in ((rows, ("ndcg@10",)), (ranking_rows, ("ndcg@10", "rank_ndcg@10"))):
        for key in keys:
            full = table["full"]
            assert full[f"{key}_vs_full"] == 0.0 and full[f"{key}_vs_full_ci95"] == [0.0, 0.0]
            assert table["recompute"][f"{key}_vs_full"] == pytest.approx(0.0, abs=1e-12)
            for row in table.values():
                low, high = row[f"{key}_vs_full_ci95"]
                assert low <= row[f"{key}_vs_full"] <= high
                if full[key]:
                    assert row[f"{key}_vs_full"] == pytest.approx(row[key] / full[key] - 1, abs=1e-9)



def test_a_row_that_merged_nothing_is_flagged(checkpoint):
    from kvrec.compression.report import markdown_table

    streams = stream_split(load_dataset(DATASET), min_future=6)
    full, shallow = run_offline(checkpoint, streams, ["full", "minicache:dtype=fp16"], events_per_request=5,
                                max_users=2, max_requests_per_user=2, progress=False)
    assert shallow["note"].startswith("merged nothing") and full["note"] == ""
    assert "| merged nothing of 0 paired tokens" in markdown_table([full, shallow])
