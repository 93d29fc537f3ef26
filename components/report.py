"""The evaluation stage's human report: a Markdown table, two plots and a self-contained HTML page.

Markdown for the CLI and the output folder; HTML with base64-embedded PNGs because a KFP HTML
artifact is shown as a single file with no access to sibling files.
"""

from __future__ import annotations

import base64
import html as html_lib
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: pipeline containers have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MISSING = "—"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
TRAINING_CURVES_PNG = "training_curves.png"
HIT_AT_K_PNG = "hit_at_k.png"


def _fmt(value: Any) -> str:
    """Floats with 4 decimals, None/NaN as a dash, everything else as str."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        return MISSING if math.isnan(float(value)) else f"{float(value):.4f}"
    return str(value)


def _columns(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    out: list[str] = []
    for row in rows:
        out.extend(k for k in row if k not in out)
    return out


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Markdown table, one row per dict; columns default to the union of keys in first-seen order."""
    cols = _columns(rows, columns)
    if not cols:
        return ""
    lines = [
        "| " + " | ".join(cols) + " |",
        "| " + " | ".join("---" for _ in cols) + " |",
    ]
    for row in rows:
        cells = [_fmt(row.get(c)).replace("|", "\\|") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_GATE_COLUMNS = ("name", "value", "threshold", "passed")


def _gate_rows(gates: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**g, "passed": "PASS" if g.get("passed") else "FAIL"} for g in gates]


def _plot_training_curves(history: dict[str, list[float]], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in history.items():
        epochs = np.arange(1, len(values) + 1)
        ax.plot(epochs, values, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("value")
    ax.set_title("Training curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _plot_hit_curves(hit_curves: dict[str, np.ndarray], path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in hit_curves.items():
        values = np.asarray(curve, dtype=np.float64).ravel()
        ax.plot(np.arange(1, values.size + 1), values, marker=".", label=name)
    ax.set_xlabel("k")
    ax.set_ylabel("hit rate@k")
    ax.set_title("Hit rate@k (5-star test ratings)")
    ax.grid(True, alpha=0.3)
    if hit_curves:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    cols = _columns(rows, columns)
    head = "".join(f"<th>{html_lib.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html_lib.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def write_report(
    out_dir: str,
    rows: list[dict[str, Any]],
    history: dict[str, list[float]] | None,
    hit_curves: dict[str, np.ndarray],
    title: str = "mtrec evaluation",
    gates: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Write report.md, report.html and the PNGs into out_dir; return name -> path.

    `rows` has one dict per system (columns are the keys); `gates` holds dicts with name, value,
    threshold and passed. training_curves.png is skipped when `history` is empty or None.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    history = {k: list(v) for k, v in (history or {}).items() if len(v) > 0}
    if history:
        paths["training_curves"] = os.path.join(out_dir, TRAINING_CURVES_PNG)
        _plot_training_curves(history, paths["training_curves"])
    paths["hit_at_k"] = os.path.join(out_dir, HIT_AT_K_PNG)
    _plot_hit_curves(hit_curves, paths["hit_at_k"])

    md = [f"# {title}", "", "## Systems", "", format_table(rows), ""]
    if gates:
        md += ["## Gates", "", format_table(_gate_rows(gates), _GATE_COLUMNS), ""]
        verdict = "BLESSED" if all(g.get("passed") for g in gates) else "NOT BLESSED"
        md += [f"Verdict: **{verdict}**", ""]
    md += ["## Plots", ""]
    if "training_curves" in paths:
        md += [f"![training curves]({TRAINING_CURVES_PNG})", ""]
    md += [f"![hit rate at k]({HIT_AT_K_PNG})", ""]
    paths["markdown"] = os.path.join(out_dir, REPORT_MD)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(md))

    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html_lib.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f0f0f0}img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>{html_lib.escape(title)}</h1>",
        "<h2>Systems</h2>",
        _html_table(rows),
    ]
    if gates:
        parts += ["<h2>Gates</h2>", _html_table(_gate_rows(gates), _GATE_COLUMNS)]
        parts.append(f"<p>Verdict: <b>{verdict}</b></p>")
    parts.append("<h2>Plots</h2>")
    for key, alt in (("training_curves", "training curves"), ("hit_at_k", "hit rate at k")):
        if key in paths:
            parts.append(f'<p><img alt="{alt}" src="{_data_uri(paths[key])}"></p>')
    parts.append("</body></html>")
    paths["html"] = os.path.join(out_dir, REPORT_HTML)
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return paths
