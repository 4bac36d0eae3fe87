"""Tables, Markdown reports and PNG plots (matplotlib, Agg backend) for runs and comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = [
    ("method", "method"), ("trainable", "trainable params"), ("pct", "%"), ("dev", "best dev"), ("test", "test"),
    ("time", "train time"), ("sps", "s/step"), ("rss", "peak RSS"), ("size", "adapter size"),
]


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for r in results:
        rows.append({
            "method": r["method"],
            "trainable": f"{r['trainable_params']:,}",
            "pct": f"{r['trainable_pct']:.2f}%" if r["trainable_pct"] >= 0.01 else f"{r['trainable_pct']:.4f}%",
            "dev": _metric(r.get("best_dev")),
            "test": _metric(r.get("test_metric")),
            "time": f"{r['train_time_s']:.1f} s",
            "sps": f"{r['s_per_step']:.3f}",
            "rss": human_bytes(r.get("peak_rss_bytes")),
            "size": human_bytes(r.get("adapter_bytes")),
        })
    return rows


def format_table(results: list[dict[str, Any]], metric: str = "accuracy") -> str:
    """A fixed-width text table, one row per method."""
    headers = {k: (f"{h} {metric}" if k in ("dev", "test") else h) for k, h in COLUMNS}
    rows = table_rows(results)
    widths = {k: max([len(headers[k])] + [len(r[k]) for r in rows]) for k, _ in COLUMNS}
    left = {"method"}

    def line(values: dict[str, str]) -> str:
        return "  ".join(values[k].ljust(widths[k]) if k in left else values[k].rjust(widths[k]) for k, _ in COLUMNS)

    out = [line(headers), "  ".join("-" * widths[k] for k, _ in COLUMNS)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_table(results: list[dict[str, Any]], metric: str = "accuracy") -> str:
    headers = [f"{h} {metric}" if k in ("dev", "test") else h for k, h in COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in table_rows(results):
        lines.append("| " + " | ".join(row[k] for k, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or None (plots are skipped with a note) when it is missing."""
    try:
        import matplotlib
    except ImportError:
        print("note: plots skipped, matplotlib is not installed (pip install matplotlib)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(history: list[dict[str, Any]], path: Path, title: str = "", metric: str = "accuracy") -> None:
    """Training loss per step and the dev metric at each evaluation."""
    plt = _pyplot()
    if plt is None:
        return
    train = [r for r in history if r.get("type") == "train"]
    evals = [r for r in history if r.get("type") == "eval" and metric in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", linewidth=1, label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if evals:
        other = ax.twinx()
        other.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:orange", label=f"dev {metric}")
        other.set_ylabel(f"dev {metric}")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_compare(results: list[dict[str, Any]], histories: dict[str, list[dict[str, Any]]], out: Path, metric: str) -> list[Path]:
    """``metric_vs_params.png`` (best dev metric against trainable parameters, log x) and ``loss_curves.png``."""
    plt = _pyplot()
    if plt is None:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.get("best_dev") is not None:
            ax.scatter(r["trainable_params"], r["best_dev"], s=40)
            ax.annotate(r["method"], (r["trainable_params"], r["best_dev"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(f"best dev {metric}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "metric_vs_params.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, history in histories.items():
        train = [r for r in history if r.get("type") == "train"]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], linewidth=1, label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if histories:  # rows evaluated from --adapters folders have no training curve
        ax.legend()
    fig.tight_layout()
    paths.append(out / "loss_curves.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def report_markdown(results: list[dict[str, Any]], settings: dict[str, Any], metric: str, plots: list[Path]) -> str:
    """``report.md``: what was compared, the table, and the plots."""
    lines = [
        "# deltatune comparison", "",
        f"- data: `{settings.get('data')}` (train subset: {settings.get('max_train') or 'all'}, eval subset: "
        f"{settings.get('max_eval') or 'all'}, max length {settings.get('max_length')})",
        f"- model: `{settings.get('model')}`; seed {settings.get('seed')}; epochs {settings.get('epochs')}; "
        f"batch size {settings.get('batch_size')}; metric: {metric}",
        "- learning rates: " + ", ".join(f"{r['method']} {r.get('lr', '-')}" for r in results), "",
        markdown_table(results, metric), "",
    ]
    flagged = [f"- **{r['method']}**: {w}" for r in results for w in r.get("warnings") or []]
    if flagged:  # a run that did not learn must not pass as a result
        lines += ["## warnings", "", *flagged, ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
