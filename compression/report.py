"""Write benchmark rows as results.json, results.csv, results.md and a Pareto plot (bytes vs NDCG@10).

Each accuracy is shown with its paired relative difference to `full` on the same requests and that
difference's 95% interval (bootstrap over users; keys `ndcg@10_vs_full`, `ndcg@10_vs_full_ci95`). Rows of
a model with a ranking head also carry the ranking head's accuracy under each policy (compression.bench):
the table then shows it beside retrieval's, with its own difference to `full`."""

from __future__ import annotations

import csv
import json
import math
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
    noted = any(r.get("note") for r in rows)
    head += ["note"] if noted else []
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
            *(extra if ranking else []), *([r.get("note") or ""] if noted else []),
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


# ------------------------------------------------------------------------- kvrec bench levels


def level_columns(rows: list[dict]) -> list[str]:
    """The CSV columns of `kvrec bench levels`, with the growth lengths its rows were measured at."""
    growth = sorted({k for r in rows for k in r if k.startswith("bytes_at_")}, key=lambda k: int(k.rsplit("_", 1)[1]))
    ratio_at = sorted({k for r in rows for k in r if k.startswith("compression_ratio_at_")})
    return ["model", "variant", "kind", "level", "policy", "bytes_per_user_mean", *growth, "compression_ratio",
            *ratio_at, "ndcg@10", "ndcg@10_vs_base", "ndcg@10_vs_base_se", "ndcg@10_vs_base_ci95", "ndcg@10_vs_full",
            "ndcg@10_vs_full_ci95", "hr@10", "macs_per_request", "ms_per_request", "target", "note", "users",
            "requests", "path"]


def _size(value) -> str:
    return "-" if not value else human_bytes(value)


def _ratio(value) -> str:
    return "-" if not value else f"{value:.1f}x"


def levels_table(rows: list[dict]) -> str:
    """The markdown table of `kvrec bench levels`: one line per (model, policy), skipped ones with their note."""
    growth = [k for k in level_columns(rows) if k.startswith("bytes_at_")]
    ratio_at = [k for k in level_columns(rows) if k.startswith("compression_ratio_at_")]
    head = ["model", "variant", "policy", "bytes/user", *(f"@{int(k.rsplit('_', 1)[1]):,} events" for k in growth),
            "ratio", *(f"ratio @{int(k.rsplit('_', 1)[1]):,}" for k in ratio_at), "NDCG@10",
            "vs base [95% CI]", "s.e.", "MACs/req", "ms/req", "target", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("skipped"):
            cells = [r["model"], r["variant"], f"`{r['policy']}`", *["-"] * (len(head) - 4), r["note"]]
        else:
            rel, ci, se = r["ndcg@10_vs_base"], r["ndcg@10_vs_base_ci95"], r["ndcg@10_vs_base_se"]
            cells = [r["model"], r["variant"], f"`{r['policy']}`", _size(r["bytes_per_user_mean"]),
                     *(_size(r.get(k)) for k in growth), _ratio(r["compression_ratio"]),
                     *(_ratio(r.get(k)) for k in ratio_at), f"{r['ndcg@10']:.4f}",
                     "-" if rel is None else f"{100 * rel:+.2f}% [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]",
                     "-" if se is None else f"{100 * se:.2f}%", f"{r['macs_per_request']:.3g}",
                     f"{r['ms_per_request']:.2f}", r["target"] or "-", r["note"] or ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CATEGORIES = {  # a row's `level` (compression.bench_levels) -> legend, marker, colour
    "reference": ("base model, full", "*", "black"),
    "post-hoc": ("post-hoc policy on the base", "o", "tab:blue"),
    "trained": ("trained level, full", "s", "tab:orange"),
    "trained+post-hoc": ("trained level + post-hoc policy", "D", "tab:green"),
}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer or equal bytes with a higher value, or fewer
    bytes with an equal one), in order of bytes: the memory-accuracy front."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def levels_plot(rows: list[dict], path: Path, title: str = "") -> None:
    """x: bytes per user (log, KiB/MiB ticks); y: NDCG@10's relative difference to the base model's `full`
    with its 95% interval; marker and colour by post-hoc vs trained level; the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    shown = [r for r in rows if not r.get("skipped") and r.get("bytes_per_user_mean") and
             r.get("ndcg@10_vs_base") is not None]
    fig, ax = plt.subplots(figsize=(10, 6.5))
    for key, (legend, marker, colour) in CATEGORIES.items():
        mine = [r for r in shown if r.get("level") == key]
        if not mine:
            continue
        x = [r["bytes_per_user_mean"] for r in mine]
        y = [100 * r["ndcg@10_vs_base"] for r in mine]
        err = [[100 * max(r["ndcg@10_vs_base"] - r["ndcg@10_vs_base_ci95"][0], 0) for r in mine],
               [100 * max(r["ndcg@10_vs_base_ci95"][1] - r["ndcg@10_vs_base"], 0) for r in mine]]
        ax.errorbar(x, y, yerr=err, fmt=marker, color=colour, ecolor=colour, elinewidth=0.8, capsize=2,
                    markersize=7 if marker == "*" else 5, label=legend, alpha=0.9)
    points = [(r["bytes_per_user_mean"], 100 * r["ndcg@10_vs_base"]) for r in shown]
    front = pareto_front(points)
    if front:
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="red",
                linewidth=1, alpha=0.6, label="Pareto front")
    for r, (x, y) in zip(shown, points, strict=True):
        ax.annotate(f"{r['model']}: {r['policy']}", (x, y), fontsize=6, alpha=0.8, xytext=(3, 3),
                    textcoords="offset points")
    for level, style in ((0.0, "-"), (-1.0, "--"), (-5.0, ":")):
        ax.axhline(level, color="grey", linestyle=style, linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=2, numticks=12))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: human_bytes(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("bytes per user (mean stored blob over the replay, log scale)")
    ax.set_ylabel("NDCG@10 vs base model's full, % (paired; bars: 95% interval; lines: 0, -1%, -5%)")
    ax.set_title(title or "MALLOC levels: memory against accuracy", fontsize=10)
    if shown:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_levels(rows: list[dict], out: str | Path, title: str = "", notes: str = "") -> Path:
    """results.json, results.csv, results.md (the table, then `notes`) and pareto.png of `kvrec bench levels`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=level_columns(rows), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    heading = " ".join(title.split("\n"))
    (out / "results.md").write_text((f"## {heading}\n\n" if title else "") + levels_table(rows) + "\n"
                                    + (f"\n{notes}\n" if notes else ""))
    levels_plot(rows, out / "pareto.png", title)
    return out
