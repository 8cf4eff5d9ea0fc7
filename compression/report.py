"""Write benchmark rows as results.json, results.csv, results.md and a Pareto plot (bytes vs NDCG@10).

Each accuracy is shown with its paired relative difference to `full` on the same requests and that
difference's 95% interval (bootstrap over users; keys `ndcg@10_vs_full`, `ndcg@10_vs_full_ci95`). Rows of
a model with a ranking head also carry the ranking head's accuracy under each policy (compression.bench):
the table then shows it beside retrieval's, with its own difference to `full`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ["policy", "ndcg@10", "ndcg@10_vs_full", "ndcg@10_vs_full_ci95", "hr@10", "gauc", "recall@10",
           "top10_overlap", "score_mae", "bytes_per_user_mean", "bytes_per_user_p50", "bytes_per_user_p99",
           "bytes_per_user_max", "compression_ratio", "macs_per_request", "ms_per_request", "ms_extend",
           "ms_compress", "ms_codec", "users", "requests", "rank_ndcg@10", "rank_ndcg@10_vs_full",
           "rank_ndcg@10_vs_full_ci95", "rank_hr@10", "rank_retrieval_ndcg@10", "rank_retrieval_hr@10",
           "engage_auc", "engage_gauc", "ms_rank"]
RANKING = ["rank NDCG@10", "rank vs full [95% CI]", "rank HR@10", "retrieval on candidates NDCG@10", "engagement AUC",
           "GAUC", "ms/rank"]


def write_results(rows: list[dict], out: str | Path, title: str = "") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text((f"## {title}\n\n" if title else "") + markdown_table(rows) + "\n")
    pareto_plot(rows, out / "pareto.png", title)
    return out


def _versus(row: dict, metric: str) -> str:
    """`-1.2% [-2.0, -0.4]`: the paired relative difference to full and its 95% interval, in percent."""
    rel, ci = row.get(f"{metric}_vs_full"), row.get(f"{metric}_vs_full_ci95")
    return "-" if rel is None else f"{100 * rel:+.2f}% [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes as a reader reads them."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown_table(rows: list[dict]) -> str:
    ranking = any(r.get("rank_ndcg@10") is not None for r in rows)
    head = ["policy", "NDCG@10", "vs full [95% CI]", "HR@10", "GAUC", "Recall@10", "top-10 overlap", "score MAE",
            "bytes/user mean", "p99", "ratio", "MACs/req", "ms/req (extend+compress+codec)"]
    if ranking:
        head += RANKING
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loss = _versus(r, "ndcg@10")
        ratio = f"{r['compression_ratio']:.1f}x" if r["compression_ratio"] else "-"
        extra = [_num(r.get("rank_ndcg@10")), _versus(r, "rank_ndcg@10"), _num(r.get("rank_hr@10")),
                 _num(r.get("rank_retrieval_ndcg@10")), _num(r.get("engage_auc")), _num(r.get("engage_gauc")),
                 "-" if r.get("ms_rank") is None else f"{r['ms_rank']:.2f}"]
        lines.append("| " + " | ".join([
            f"`{r['policy']}`", f"{r['ndcg@10']:.4f}", loss, f"{r['hr@10']:.4f}", f"{r['gauc']:.4f}",
            f"{r['recall@10']:.4f}", f"{r['top10_overlap']:.3f}", f"{r['score_mae']:.4f}",
            human_bytes(r["bytes_per_user_mean"]), human_bytes(r["bytes_per_user_p99"]), ratio,
            f"{r['macs_per_request']:.3g}",
            f"{r['ms_per_request']:.2f} ({r['ms_extend']:.2f}+{r['ms_compress']:.2f}+{r['ms_codec']:.2f})",
            *(extra if ranking else []),
        ]) + " |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = [r for r in rows if r["bytes_per_user_mean"] > 0]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.scatter([r["bytes_per_user_mean"] for r in stored], [r["ndcg@10"] for r in stored], s=18)
    full = next((r for r in rows if r["policy"] == "full"), None)
    for r in stored:
        ax.annotate(r["policy"], (r["bytes_per_user_mean"], r["ndcg@10"]), fontsize=6, alpha=0.8)
        if full and r.get("ndcg@10_vs_full_ci95"):  # the paired 95% interval, in NDCG units around the point
            rel, (low, high) = r["ndcg@10_vs_full"], r["ndcg@10_vs_full_ci95"]
            ax.errorbar(r["bytes_per_user_mean"], r["ndcg@10"], color="grey", capsize=2, linewidth=0.8,
                        yerr=[[full["ndcg@10"] * max(rel - low, 0)], [full["ndcg@10"] * max(high - rel, 0)]])
    if full:
        for frac, style in ((1.0, "-"), (0.99, "--"), (0.95, ":")):
            ax.axhline(full["ndcg@10"] * frac, color="grey", linestyle=style, linewidth=0.8,
                       label=f"{frac:.0%} of full" if frac < 1 else "full")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _pos: human_bytes(v)))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("bytes per user (mean blob size, log scale; bars: 95% interval of the paired difference to full)")
    ax.set_ylabel("NDCG@10 (next event, whole catalogue)")
    ax.set_title(title or "policies: memory against accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
