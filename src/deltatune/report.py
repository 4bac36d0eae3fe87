"""Tables, Markdown reports and PNG plots (matplotlib, Agg backend) for runs and comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = [
    ("method", "method"), ("trainable", "trainable params"), ("pct", "%"), ("dev", "best dev"), ("test", "test"),
    ("time", "train time"), ("sps", "s/step"), ("rss", "peak RSS"), ("size", "adapter size"),
]
# causal-LM comparisons (``deltatune.compare_lm``): the base model's row first, judged by loss, generation, forgetting
LM_COLUMNS = [
    ("method", "method"), ("trainable", "trainable params"), ("pct", "%"), ("heldout", "held-out loss"),
    ("em", "exact match"), ("forget", "forgetting"), ("time", "train time"), ("tps", "tokens/s"), ("rss", "peak RSS"),
    ("size", "adapter size"),
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


def _exact_match(r: dict[str, Any]) -> str:
    if r.get("exact_match") is None:
        return "-"
    rows = r.get("em_rows") or 0
    return f"{r['exact_match']:.3f} ({round(r['exact_match'] * rows)}/{rows})"


def table_row(r: dict[str, Any]) -> dict[str, str]:
    """One result as the table's cells (a row that did not run: its reason in the method cell's ``reason``)."""
    if "trainable_params" not in r:
        return {"method": r["method"], "reason": f"{r.get('status', 'failed')}: {r.get('reason', '')}"}
    pct = r["trainable_pct"]
    tps = r.get("tokens_per_s")
    if tps is None and r.get("train_time_s"):
        tps = r.get("tokens", 0) / r["train_time_s"]
    return {
        "method": r["method"],
        "trainable": f"{r['trainable_params']:,}",
        "pct": "0%" if pct == 0 else f"{pct:.2f}%" if pct >= 0.01 else f"{pct:.4f}%",
        "dev": _metric(r.get("best_dev")),
        "test": _metric(r.get("test_metric")),
        "heldout": _metric(r.get("heldout_loss")),
        "em": _exact_match(r),
        "forget": "-" if r.get("forgetting") is None else f"{r['forgetting']:+.4f}",
        "time": f"{r['train_time_s']:.1f} s",
        "sps": f"{r['s_per_step']:.3f}",
        "tps": "-" if not tps else f"{tps:.0f}",
        "rss": human_bytes(r.get("peak_rss_bytes")),
        "size": human_bytes(r.get("adapter_bytes")),
    }


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [table_row(r) for r in results]


def columns_for(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The causal-LM columns when the rows carry held-out loss / exact match, else the classification ones."""
    return LM_COLUMNS if any("heldout_loss" in r or "exact_match" in r for r in results) else COLUMNS


def format_table(results: list[dict[str, Any]], metric: str = "accuracy") -> str:
    """A fixed-width text table, one row per method (a row that did not run shows its reason)."""
    columns = columns_for(results)
    headers = {k: (f"{h} {metric}" if k in ("dev", "test") else h) for k, h in columns}
    rows = table_rows(results)
    widths = {k: max([len(headers[k])] + [len(r[k]) for r in rows if k in r]) for k, _ in columns}

    def line(values: dict[str, str]) -> str:
        if "reason" in values:
            return values["method"].ljust(widths["method"]) + "  " + values["reason"]
        return "  ".join(values[k].ljust(widths[k]) if k == "method" else values[k].rjust(widths[k]) for k, _ in columns)

    out = [line(headers), "  ".join("-" * widths[k] for k, _ in columns)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_table(results: list[dict[str, Any]], metric: str = "accuracy") -> str:
    columns = columns_for(results)
    headers = [f"{h} {metric}" if k in ("dev", "test") else h for k, h in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in table_rows(results):
        cells = [row["method"], row["reason"]] + [""] * (len(columns) - 2) if "reason" in row else [row[k] for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
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
    if columns_for(results) is LM_COLUMNS:
        paths.append(plot_lm_vs_params(plt, results, out))
        return paths + [plot_loss_curves(plt, histories, out)]
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
    return paths + [plot_loss_curves(plt, histories, out)]


def plot_loss_curves(plt: Any, histories: dict[str, list[dict[str, Any]]], out: Path) -> Path:
    """``loss_curves.png``: the training loss per step of every run."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, history in histories.items():
        train = [r for r in history if r.get("type") == "train"]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], linewidth=1, label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    if histories:  # rows evaluated from --adapters folders have no training curve
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)
    return out / "loss_curves.png"


def plot_lm_vs_params(plt: Any, results: list[dict[str, Any]], out: Path) -> Path:
    """``metric_vs_params.png`` of a causal-LM comparison: held-out loss, exact match and forgetting against
    trainable parameters (log x); the base model (no trainable parameters) is the dashed line."""
    panels = [("heldout_loss", "held-out completion loss"), ("exact_match", "exact match"), ("forgetting", "forgetting")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, label) in zip(axes, panels):
        for r in results:
            if r.get(key) is None:
                continue
            if r["trainable_params"] == 0:
                ax.axhline(r[key], linestyle="--", color="gray", linewidth=1, label=r["method"])
                continue
            ax.scatter(r["trainable_params"], r[key], s=40)
            ax.annotate(r["method"], (r["trainable_params"], r[key]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "metric_vs_params.png", dpi=100)
    plt.close(fig)
    return out / "metric_vs_params.png"


def report_markdown(results: list[dict[str, Any]], settings: dict[str, Any], metric: str, plots: list[Path],
                    extra: list[str] | tuple[str, ...] = ()) -> str:
    """``report.md``: what was compared, the table, the plots, then ``extra`` lines (e.g. sample generations)."""
    lines = [
        "# deltatune comparison", "",
        f"- data: `{settings.get('data')}` (train subset: {settings.get('max_train') or 'all'}, eval subset: "
        f"{settings.get('max_eval') or 'all'}, max length {settings.get('max_length')})",
        f"- model: `{settings.get('model')}`; seed {settings.get('seed')}; epochs {settings.get('epochs')}; "
        f"batch size {settings.get('batch_size')}; metric: {metric}",
        "- learning rates: " + ", ".join(f"{r['method']} {r.get('lr') or '-'}" for r in results), "",
        markdown_table(results, metric), "",
    ]
    flagged = [f"- **{r['method']}**: {w}" for r in results for w in r.get("warnings") or []]
    if flagged:  # a run that did not learn must not pass as a result
        lines += ["## warnings", "", *flagged, ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join([*lines, "", *extra]) + "\n"
