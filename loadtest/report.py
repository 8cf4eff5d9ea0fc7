"""The sweep's results: one summary row per policy, the Pareto front, the files and the plots.

Where each number comes from (also written into report.md):
- bytes_per_user_mean, compression_ratio: the service's `/metrics` (`state`), read after the run;
  projected_bytes_1e9_users = bytes_per_user_mean x 1e9, the state blobs alone (the event logs are the
  same under every policy and are not counted).
- redis_used_memory: Redis `INFO memory` used_memory after the run minus before it (the namespace is
  fresh for every policy), so it counts this policy's states and event logs and not Redis' own baseline.
- rps, p50_ms, p95_ms, p99_ms: client side, from the per-request records: successful requests over the
  span from the first request's start to the last one's end; latency as Locust measured it.
- ndcg@10, hr@10: client side, each answer's top 10 against the items of that user's next request,
  averaged over the requests that every policy of the sweep answered (a faster policy gets further
  into the streams in the same time, and later requests of a stream are easier or harder than early
  ones; comparing on common requests removes that bias; when no request is common to all, each
  policy's own). Each policy's average over all of its own requests is in the second table.
- top10_overlap: for every request that both this policy's run and `full`'s run made (same user, same
  request index; the replay is deterministic), |top10 ∩ full's top10| / |full's top10|, averaged.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvrec.models.metrics import percentile

SUMMARY_KEYS = ("policy", "bytes_per_user_mean", "redis_used_memory", "compression_ratio", "rps", "p50_ms",
                "p95_ms", "p99_ms", "ndcg@10", "hr@10", "top10_overlap", "projected_bytes_1e9_users")
REFERENCE_POLICY = "full"


def _percentile(values: list[float], q: float) -> float | None:
    """The shared percentile (kvrec.models.metrics), None when a run has no successful request."""
    return percentile(values, q) if values else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def request_key(record: dict) -> tuple[str, int]:
    """What identifies a request across runs: the replay is deterministic per (user, request index)."""
    return record["user_id"], record["request"]


def scored_keys(records: list[dict]) -> set[tuple[str, int]]:
    return {request_key(r) for r in records if r["ok"] and r["ndcg@10"] is not None}


def client_stats(records: list[dict], only: set[tuple[str, int]] | None = None) -> dict:
    """rps, latency percentiles and accuracy of one run's records (see the module docstring);
    accuracy over the requests in `only` when given."""
    ok = [r for r in records if r["ok"]]
    span = (max(r["t"] + r["latency_ms"] / 1000 for r in ok) - min(r["t"] for r in ok)) if ok else 0.0
    latencies = [r["latency_ms"] for r in ok]
    scored = [r for r in ok if r["ndcg@10"] is not None and (only is None or request_key(r) in only)]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "rps": len(ok) / span if span > 0 else None,
        "p50_ms": _percentile(latencies, 50),
        "p95_ms": _percentile(latencies, 95),
        "p99_ms": _percentile(latencies, 99),
        "ndcg@10": _mean([r["ndcg@10"] for r in scored]),
        "hr@10": _mean([r["hit@10"] for r in scored]),
        "scored": len(scored),
    }


def top10_overlap(records: list[dict], reference: list[dict]) -> float | None:
    """Mean share of the reference's top 10 that this run also returned, over matching requests."""
    ref = {request_key(r): r["top10"] for r in reference if r["ok"] and r["top10"]}
    shares = []
    for r in records:
        theirs = ref.get(request_key(r))
        if r["ok"] and theirs is not None:
            shares.append(len(set(r["top10"]) & set(theirs)) / len(theirs))
    return _mean(shares)


def summary_row(policy: str, records: list[dict], metrics: dict, redis_used_memory: int | None,
                reference: list[dict] | None, common: set[tuple[str, int]] | None = None) -> dict:
    """One summary row with exactly SUMMARY_KEYS; missing measurements are None. `reference`: the
    `full` run's records, for top10_overlap; `common`: the requests accuracy is averaged over."""
    state = metrics.get("state") or {}
    per_user = state.get("bytes_per_user_mean")
    stats = client_stats(records, common)
    row = {
        "policy": policy,
        "bytes_per_user_mean": per_user,
        "redis_used_memory": redis_used_memory,
        "compression_ratio": state.get("compression_ratio"),
        **{k: stats[k] for k in ("rps", "p50_ms", "p95_ms", "p99_ms", "ndcg@10", "hr@10")},
        "top10_overlap": None if reference is None else top10_overlap(records, reference),
        "projected_bytes_1e9_users": None if per_user is None else per_user * 1e9,
    }
    return {k: row[k] for k in SUMMARY_KEYS}


def pareto_front(rows: list[dict], x: str = "bytes_per_user_mean", y: str = "ndcg@10") -> list[str]:
    """Policies not dominated on (smaller x, larger y), sorted by x.

    Rows without both numbers, and rows with x == 0 (a policy that keeps no state, `recompute`, pays in
    throughput instead, which this plane does not show), take no part.
    """
    pts = [r for r in rows if r.get(x) is not None and r.get(y) is not None and r[x] > 0]

    def dominated(r: dict) -> bool:
        return any(o[x] <= r[x] and o[y] >= r[y] and (o[x] < r[x] or o[y] > r[y]) for o in pts)

    return [r["policy"] for r in sorted(pts, key=lambda r: (r[x], -r[y])) if not dominated(r)]


# ----------------------------------------------------------------------------------------------- files


def format_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key in ("bytes_per_user_mean", "redis_used_memory", "projected_bytes_1e9_users"):
        return human_bytes(value)
    if key in ("ndcg@10", "hr@10", "top10_overlap"):
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def markdown_table(rows: list[dict], front: list[str] | None = None) -> str:
    """One row per policy; policies on the Pareto front are marked with *."""
    front = front or []
    head = "| " + " | ".join(SUMMARY_KEYS) + " |"
    sep = "|" + "|".join("---" for _ in SUMMARY_KEYS) + "|"
    body = []
    for r in rows:
        cells = [format_value(k, r[k]) for k in SUMMARY_KEYS]
        cells[0] = f"{cells[0]} *" if r["policy"] in front else cells[0]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_summary(out: Path, rows: list[dict]) -> None:
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_KEYS)
        w.writeheader()
        w.writerows(rows)


def write_report(out: Path, rows: list[dict], records: dict[str, list[dict]], title: str,
                 details: list[str]) -> list[Path]:
    """summary.json, summary.csv, report.md and the plots; returns the plot paths."""
    out.mkdir(parents=True, exist_ok=True)
    write_summary(out, rows)
    front = pareto_front(rows)
    plots = [plot_pareto(out / "bytes_vs_ndcg.png", rows, front),
             plot_throughput(out / "throughput_vs_bytes.png", rows),
             plot_latency_cdf(out / "latency_cdf.png", records)]
    stats = {p: client_stats(recs) for p, recs in records.items()}
    lines = [f"# {title}", "", *details, "",
             markdown_table(rows, front), "",
             "`*`: on the Pareto front of bytes per user against NDCG@10 (policies that keep a state).", "",
             "| policy | requests | errors | scored for accuracy | ndcg@10, all own requests |",
             "|---|---|---|---|---|",
             *[f"| {p} | {s['requests']} | {s['errors']} | {s['scored']} | {format_value('ndcg@10', s['ndcg@10'])} |"
               for p, s in stats.items()], "",
             "## How the numbers are measured", "",
             __doc__.split("Where each number comes from (also written into report.md):\n", 1)[1].strip(), "",
             *[f"![{p.stem}]({p.name})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(lines))
    return plots


# ----------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a server
    import matplotlib.pyplot as plt

    return plt


def _stateless_lines(ax, rows: list[dict], y: str) -> None:
    """Policies with no state have no place on a log bytes axis: drawn as labelled horizontal lines."""
    for r in rows:
        if r["bytes_per_user_mean"] == 0 and r.get(y) is not None:
            ax.axhline(r[y], color="grey", linestyle="--", linewidth=1)
            ax.annotate(f"{r['policy']} (no state)", (0.99, r[y]), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, -11), fontsize=8, color="grey", ha="right")


def plot_pareto(path: Path, rows: list[dict], front: list[str]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in rows if r["bytes_per_user_mean"] and r["ndcg@10"] is not None]
    for r in pts:
        on = r["policy"] in front
        ax.scatter(r["bytes_per_user_mean"], r["ndcg@10"], color="tab:red" if on else "tab:blue",
                   marker="*" if on else "o", s=120 if on else 40, zorder=3)
        ax.annotate(r["policy"], (r["bytes_per_user_mean"], r["ndcg@10"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    front_pts = sorted((r for r in pts if r["policy"] in front), key=lambda r: r["bytes_per_user_mean"])
    if front_pts:
        ax.step([r["bytes_per_user_mean"] for r in front_pts], [r["ndcg@10"] for r in front_pts],
                where="post", color="tab:red", alpha=0.6, label="Pareto front")
        ax.legend(loc="best")
    _stateless_lines(ax, rows, "ndcg@10")
    return _save_bytes_plot(plt, fig, ax, path, bool(pts), "online NDCG@10", "memory against accuracy, per policy")


def plot_throughput(path: Path, rows: list[dict]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [r for r in rows if r["bytes_per_user_mean"] and r["rps"] is not None]
    for r in pts:
        ax.scatter(r["bytes_per_user_mean"], r["rps"], color="tab:green", zorder=3)
        ax.annotate(r["policy"], (r["bytes_per_user_mean"], r["rps"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    _stateless_lines(ax, rows, "rps")
    return _save_bytes_plot(plt, fig, ax, path, bool(pts), "requests per second",
                            "throughput against memory, per policy")


def _save_bytes_plot(plt, fig, ax, path: Path, log_x: bool, ylabel: str, title: str) -> Path:
    """The common finish of the plots whose x axis is state bytes per user."""
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("state bytes per user (mean)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency_cdf(path: Path, records: dict[str, list[dict]]) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, recs in records.items():
        xs = sorted(r["latency_ms"] for r in recs if r["ok"])
        if xs:
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=policy)
    if ax.lines:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("request latency (ms, client side)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("latency CDF, per policy")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
