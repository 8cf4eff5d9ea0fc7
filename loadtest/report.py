"""The sweep's results: one summary row per policy, the Pareto front, the files and the plots.

Where each number comes from (also written into report.md):
- bytes_per_user_mean, compression_ratio: the service's `/metrics` (`state`), read after the run;
  projected_bytes_1e9_users = bytes_per_user_mean x 1e9, the state blobs alone (the event logs are the
  same under every policy and are not counted).
- redis_used_memory: Redis `INFO memory` used_memory after the run minus before it (the namespace is
  fresh for every policy), so it counts this policy's states and event logs and not Redis' own baseline.
- rps, p50_ms, p95_ms, p99_ms: client side, from the per-request records: successful requests over the
  span from the first request's start to the last one's end; latency as Locust measured it in a closed
  loop (each virtual user waits for its answer), from each request's intended send time in an open loop
  (`--rate`: requests leave on a schedule whatever the answers do, so a queue in front of the service
  counts; a request never sent or never answered by the end counts with the time it had waited).
- offered_rps, late, unsent (open loop only): the rate asked for; requests that left more than 10 ms
  after their intended time (no free replayed user or slot, or a saturated load generator: see
  `--locust-workers`); requests due but never sent or never answered before the run ended (errors).
- capacity_rps@p99<=Xms (`--find-capacity`): the highest open-loop rate at which a short step had p99
  at most X ms, no error and nothing unsent, found by doubling from `--min-rate` and then bisecting,
  in at most `--capacity-steps` steps of `--step-duration`, each from the same warmed-up states; the
  row's other client-side columns are that step's. `>=` in the table: the highest rate tried was
  sustained; `<`: not even the lowest was.
- ndcg@10, hr@10: client side, each answer's top 10 against the items of that user's next request,
  averaged over the requests that every policy of the sweep answered (a faster policy gets further
  into the streams in the same time, and later requests of a stream are easier or harder than early
  ones; comparing on common requests removes that bias; when no request is common to all, each
  policy's own). Each policy's average over all of its own requests is in the second table.
- ndcg@10_vs_full, ndcg@10_vs_full_ci95: the relative difference of this policy's NDCG@10 to `full`'s,
  paired on the requests both runs scored (same user, same request index), and its 95% interval from
  a bootstrap over users (kvrec.models.uncertainty): an interval that holds 0 means no cost measurable
  on this many requests. The plot's error bars are that interval.
- mode: how the service ranked (its answers' `mode`): `ranking` when candidates were sent to a model
  with a ranking head (NDCG@10 is then ranking accuracy among the sampled candidates), else `retrieval`.
- top10_overlap: for every request that both this policy's run and `full`'s run made (same user, same
  request index; the replay is deterministic), |top10 ∩ full's top10| / |full's top10|, averaged.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kvrec.compression.report import human_bytes
from kvrec.models.metrics import percentile
from kvrec.models.uncertainty import PairedDifference, paired_difference

SUMMARY_KEYS = ("policy", "mode", "bytes_per_user_mean", "redis_used_memory", "compression_ratio", "rps", "p50_ms",
                "p95_ms", "p99_ms", "ndcg@10", "ndcg@10_vs_full", "ndcg@10_vs_full_ci95", "hr@10", "top10_overlap",
                "projected_bytes_1e9_users")
OPEN_LOOP_KEYS = ("offered_rps", "late", "unsent")  # after p99_ms, in open-loop sweeps only
CAPACITY_PREFIX = "capacity_rps@p99<="  # before rps, with --find-capacity only
REFERENCE_POLICY = "full"
LATE_MS = 10.0  # loadtest.arrivals.LATE_S: a request that left later than this was not sent on time


def capacity_key(p99_ms: float) -> str:
    """The capacity column's name, which states its latency target: `capacity_rps@p99<=50ms`."""
    return f"{CAPACITY_PREFIX}{p99_ms:g}ms"


def columns(rows: list[dict]) -> list[str]:
    """The summary's columns: SUMMARY_KEYS, with a capacity column before rps and the open-loop columns
    after p99_ms when some row has them (a closed-loop sweep's rows have exactly SUMMARY_KEYS)."""
    present = {k for r in rows for k in r}
    cols = []
    for key in SUMMARY_KEYS:
        if key == "rps":
            cols += sorted(k for k in present if k.startswith(CAPACITY_PREFIX))
        cols.append(key)
        if key == "p99_ms":
            cols += [k for k in OPEN_LOOP_KEYS if k in present]
    return cols


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
    # an open loop's unsent request waited at least its latency_ms: leaving it out would hide the queue
    latencies = [r["latency_ms"] for r in records if r["ok"] or r.get("unsent")]
    scored = [r for r in ok if r["ndcg@10"] is not None and (only is None or request_key(r) in only)]
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "unsent": sum(bool(r.get("unsent")) for r in records),
        "late": sum((r.get("send_lag_ms") or 0.0) > LATE_MS for r in records),
        "rps": len(ok) / span if span > 0 else None,
        "p50_ms": _percentile(latencies, 50),
        "p95_ms": _percentile(latencies, 95),
        "p99_ms": _percentile(latencies, 99),
        "ndcg@10": _mean([r["ndcg@10"] for r in scored]),
        "hr@10": _mean([r["hit@10"] for r in scored]),
        "scored": len(scored),
    }


def vs_reference(records: list[dict], reference: list[dict]) -> PairedDifference | None:
    """NDCG@10 of this run against the reference run's, paired on the requests both scored."""
    ref = {request_key(r): r["ndcg@10"] for r in reference if r["ok"] and r["ndcg@10"] is not None}
    pairs = [(ref[request_key(r)], r["ndcg@10"], r["user_id"]) for r in records
             if r["ok"] and r["ndcg@10"] is not None and request_key(r) in ref]
    return paired_difference(*map(list, zip(*pairs))) if pairs else None


def answer_mode(records: list[dict]) -> str | None:
    """The mode the service answered in (`ranking` or `retrieval`), the most frequent among answers."""
    modes = [r["mode"] for r in records if r["ok"] and r.get("mode")]
    return max(set(modes), key=modes.count) if modes else None


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
                reference: list[dict] | None, common: set[tuple[str, int]] | None = None, *,
                offered_rps: float | None = None, capacity: tuple[str, float | None] | None = None) -> dict:
    """One summary row with exactly SUMMARY_KEYS, plus the open-loop columns when `offered_rps` is given
    and the (key, value) of `capacity`; missing measurements are None. `reference`: the `full` run's
    records, for top10_overlap; `common`: the requests accuracy is averaged over."""
    state = metrics.get("state") or {}
    per_user = state.get("bytes_per_user_mean")
    stats = client_stats(records, common)
    paired = None if reference is None else vs_reference(records, reference)
    row = {
        "policy": policy,
        "mode": answer_mode(records),
        "bytes_per_user_mean": per_user,
        "redis_used_memory": redis_used_memory,
        "compression_ratio": state.get("compression_ratio"),
        **{k: stats[k] for k in ("rps", "p50_ms", "p95_ms", "p99_ms", "ndcg@10", "hr@10")},
        "ndcg@10_vs_full": None if paired is None else paired.relative,
        "ndcg@10_vs_full_ci95": None if paired is None else list(paired.ci95),
        "top10_overlap": None if reference is None else top10_overlap(records, reference),
        "projected_bytes_1e9_users": None if per_user is None else per_user * 1e9,
    }
    if offered_rps is not None:
        row.update(offered_rps=offered_rps, late=stats["late"], unsent=stats["unsent"])
    if capacity is not None:
        row[capacity[0]] = capacity[1]
    return {k: row[k] for k in columns([row])}


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
    if key == "ndcg@10_vs_full":
        return f"{value:+.1%}"
    if key == "ndcg@10_vs_full_ci95":
        return f"[{value[0]:+.1%}, {value[1]:+.1%}]"
    if isinstance(value, CapacityBound):
        return f"{value.sign}{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


class CapacityBound(float):
    """A capacity that is only a bound: `>=` the highest rate tried (all sustained) or `<` the lowest
    (none was). A float, so that JSON and CSV hold the number; the table shows the sign."""

    def __new__(cls, rate: float, sign: str):
        obj = super().__new__(cls, rate)
        obj.sign = sign
        return obj


def markdown_table(rows: list[dict], front: list[str] | None = None) -> str:
    """One row per policy; policies on the Pareto front are marked with *."""
    front = front or []
    keys = columns(rows)
    head = "| " + " | ".join(keys) + " |"
    sep = "|" + "|".join("---" for _ in keys) + "|"
    body = []
    for r in rows:
        cells = [format_value(k, r.get(k)) for k in keys]
        cells[0] = f"{cells[0]} *" if r["policy"] in front else cells[0]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def write_summary(out: Path, rows: list[dict]) -> None:
    (out / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(rows))
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
    reference = next((r["ndcg@10"] for r in rows if r["policy"] == REFERENCE_POLICY), None)
    for r in pts:
        on = r["policy"] in front
        ax.scatter(r["bytes_per_user_mean"], r["ndcg@10"], color="tab:red" if on else "tab:blue",
                   marker="*" if on else "o", s=120 if on else 40, zorder=3)
        if reference and r.get("ndcg@10_vs_full_ci95"):  # the paired interval, in NDCG units around the point
            low, high = r["ndcg@10_vs_full_ci95"]
            rel = r["ndcg@10_vs_full"]
            ax.errorbar(r["bytes_per_user_mean"], r["ndcg@10"], yerr=[[reference * max(rel - low, 0)],
                        [reference * max(high - rel, 0)]], color="grey", capsize=3, zorder=2)
        ax.annotate(r["policy"], (r["bytes_per_user_mean"], r["ndcg@10"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    front_pts = sorted((r for r in pts if r["policy"] in front), key=lambda r: r["bytes_per_user_mean"])
    if front_pts:
        ax.step([r["bytes_per_user_mean"] for r in front_pts], [r["ndcg@10"] for r in front_pts],
                where="post", color="tab:red", alpha=0.6, label="Pareto front")
        ax.legend(loc="best")
    _stateless_lines(ax, rows, "ndcg@10")
    return _save_bytes_plot(plt, fig, ax, path, bool(pts), "online NDCG@10",
                            "memory against accuracy, per policy (bars: 95% interval of the paired difference to full)")


def plot_throughput(path: Path, rows: list[dict]) -> Path:
    """Each policy's capacity when the sweep searched for it, else its measured rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    y = next((k for k in columns(rows) if k.startswith(CAPACITY_PREFIX)), "rps")
    pts = [r for r in rows if r["bytes_per_user_mean"] and r.get(y) is not None]
    for r in pts:
        ax.scatter(r["bytes_per_user_mean"], r[y], color="tab:green", zorder=3)
        ax.annotate(r["policy"], (r["bytes_per_user_mean"], r[y]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    _stateless_lines(ax, rows, y)
    label = f"requests per second at p99 <= {y[len(CAPACITY_PREFIX):]}" if y != "rps" else "requests per second"
    return _save_bytes_plot(plt, fig, ax, path, bool(pts), label, "throughput against memory, per policy")


def _save_bytes_plot(plt, fig, ax, path: Path, log_x: bool, ylabel: str, title: str) -> Path:
    """The common finish of the plots whose x axis is state bytes per user."""
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _pos: human_bytes(v)))
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
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
