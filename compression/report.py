"""Write benchmark rows as results.json, results.csv, results.md and a Pareto plot (bytes vs NDCG@10)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from kvrec.compression.bench import relative_loss

COLUMNS = ["policy", "ndcg@10", "hr@10", "gauc", "recall@10", "top10_overlap", "score_mae", "bytes_per_user_mean",
           "bytes_per_user_p50", "bytes_per_user_p99", "bytes_per_user_max", "compression_ratio",
           "macs_per_request", "ms_per_request", "ms_extend", "ms_compress", "ms_codec", "users", "requests"]


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


def markdown_table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["policy"] == "full"), None)
    head = ["policy", "NDCG@10", "rel. loss", "HR@10", "GAUC", "Recall@10", "top-10 overlap", "score MAE",
            "bytes/user mean", "p99", "ratio", "MACs/req", "ms/req (extend+compress+codec)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        loss = relative_loss(r, full) if full else math.nan
        loss = "-" if math.isnan(loss) else f"{100 * loss:+.2f}%"
        ratio = f"{r['compression_ratio']:.1f}x" if r["compression_ratio"] else "-"
        lines.append("| " + " | ".join([
            f"`{r['policy']}`", f"{r['ndcg@10']:.4f}", loss, f"{r['hr@10']:.4f}", f"{r['gauc']:.4f}",
            f"{r['recall@10']:.4f}", f"{r['top10_overlap']:.3f}", f"{r['score_mae']:.4f}",
            f"{r['bytes_per_user_mean']:,.0f}", f"{r['bytes_per_user_p99']:,.0f}", ratio,
            f"{r['macs_per_request']:.3g}",
            f"{r['ms_per_request']:.2f} ({r['ms_extend']:.2f}+{r['ms_compress']:.2f}+{r['ms_codec']:.2f})",
        ]) + " |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = [r for r in rows if r["bytes_per_user_mean"] > 0]
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.scatter([r["bytes_per_user_mean"] for r in stored], [r["ndcg@10"] for r in stored], s=18)
    for r in stored:
        ax.annotate(r["policy"], (r["bytes_per_user_mean"], r["ndcg@10"]), fontsize=6, alpha=0.8)
    full = next((r for r in rows if r["policy"] == "full"), None)
    if full:
        for frac, style in ((1.0, "-"), (0.99, "--"), (0.95, ":")):
            ax.axhline(full["ndcg@10"] * frac, color="grey", linestyle=style, linewidth=0.8,
                       label=f"{frac:.0%} of full" if frac < 1 else "full")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes per user (mean blob size, log scale)")
    ax.set_ylabel("NDCG@10 (next event, whole catalogue)")
    ax.set_title(title or "policies: memory against accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
