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
VALIDATION_PREFIX = "val_"  # Keras' name for a metric on the validation data
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


def training_panels(history: dict[str, list[float]]) -> dict[str, dict[str, list[float]]]:
    """metric -> {"train": values, "validation": values}: one panel per training metric, so
    metrics of different scales (a loss near 20, an RMSE near 0.2) never share an axis."""
    panels: dict[str, dict[str, list[float]]] = {}
    for name, values in history.items():
        base = name[len(VALIDATION_PREFIX) :] if name.startswith(VALIDATION_PREFIX) else name
        kind = "validation" if name.startswith(VALIDATION_PREFIX) else "train"
        panels.setdefault(base, {})[kind] = list(values)
    return panels


def _plot_training_curves(history: dict[str, list[float]], path: str) -> None:
    panels = training_panels(history)
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.6 * rows), squeeze=False)
    for ax, (name, curves) in zip(axes.ravel(), panels.items(), strict=False):
        for kind, values in curves.items():
            ax.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3, label=kind)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
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


def _key_values(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"setting": key, "value": value} for key, value in values.items()]


def _sections(
    data: dict[str, Any] | None,
    configuration: dict[str, dict[str, Any]] | None,
    timings: dict[str, Any] | None,
) -> list[tuple[str, list[dict[str, Any]]]]:
    """The report's small tables: data statistics, stage timings, configuration."""
    out = []
    if data:
        flat = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update({f"{key}: {k}": v for k, v in value.items()})
            else:
                flat[key] = value
        out.append(("Data", _key_values(flat)))
    if timings:
        out.append(("Stage timings", _key_values(timings)))
    for name, values in (configuration or {}).items():
        shown = {
            k: ",".join(map(str, v)) if isinstance(v, list | tuple) else v
            for k, v in values.items()
        }
        out.append((f"Configuration: {name}", _key_values(shown)))
    return out


def write_report(
    out_dir: str,
    rows: list[dict[str, Any]],
    hit_curves: dict[str, np.ndarray],
    gates: list[dict[str, Any]] | None = None,
    history: dict[str, list[float]] | None = None,
    data: dict[str, Any] | None = None,
    configuration: dict[str, dict[str, Any]] | None = None,
    timings: dict[str, Any] | None = None,
    slices: dict[str, list[dict[str, Any]]] | None = None,
    notes: list[str] | None = None,
    title: str = "mtrec evaluation",
) -> dict[str, str]:
    """Write report.md, report.html and the PNGs into out_dir; return name -> path.

    `rows` has one dict per system (columns are the keys); `gates` holds dicts with name, value,
    threshold and passed. training_curves.png (one panel per metric, train vs validation) is
    skipped when `history` is empty or None.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str] = {}
    history = {k: list(v) for k, v in (history or {}).items() if len(v) > 0}
    if history:
        paths["training_curves"] = os.path.join(out_dir, TRAINING_CURVES_PNG)
        _plot_training_curves(history, paths["training_curves"])
    paths["hit_at_k"] = os.path.join(out_dir, HIT_AT_K_PNG)
    _plot_hit_curves(hit_curves, paths["hit_at_k"])
    sections = _sections(data, configuration, timings)
    verdict = "BLESSED" if gates and all(g.get("passed") for g in gates) else "NOT BLESSED"

    md = [f"# {title}", ""]
    if gates:
        md += [f"Verdict: **{verdict}**", ""]
    md += ["## Systems", "", format_table(rows), ""]
    md += [f"- {note}" for note in notes or []] + ([""] if notes else [])
    if gates:
        md += ["## Gates", "", format_table(_gate_rows(gates), _GATE_COLUMNS), ""]
    for name, table in (slices or {}).items():
        md += [f"## Slices {name}", "", format_table(table), ""]
    md += ["## Plots", ""]
    if "training_curves" in paths:
        md += [f"![training curves]({TRAINING_CURVES_PNG})", ""]
    md += [f"![hit rate at k]({HIT_AT_K_PNG})", ""]
    for name, table in sections:
        md += [f"## {name}", "", format_table(table), ""]
    paths["markdown"] = os.path.join(out_dir, REPORT_MD)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(md))

    colour = "#1a7f37" if verdict == "BLESSED" else "#cf222e"
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html_lib.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{html_lib.escape(title)}</h1>",
    ]
    if gates:
        parts.append(f'<p class="verdict" style="background:{colour}">{verdict}</p>')
    parts += ["<h2>Systems</h2>", _html_table(rows)]
    parts += [f"<p class=note>{html_lib.escape(note)}</p>" for note in notes or []]
    if gates:
        parts += ["<h2>Gates</h2>", _html_table(_gate_rows(gates), _GATE_COLUMNS)]
    if slices:
        parts.append('<div class="grid">')
        for name, table in slices.items():
            parts.append(
                f"<section><h2>Slices {html_lib.escape(name)}</h2>{_html_table(table)}</section>"
            )
        parts.append("</div>")
    parts.append("<h2>Training and hit rate</h2>")
    for key, alt in (("training_curves", "training curves"), ("hit_at_k", "hit rate at k")):
        if key in paths:
            parts.append(f'<p><img alt="{alt}" src="{_data_uri(paths[key])}"></p>')
    parts.append('<div class="grid">')
    for name, table in sections:
        parts.append(f"<section><h2>{html_lib.escape(name)}</h2>{_html_table(table)}</section>")
    parts += ["</div>", "</body></html>"]
    paths["html"] = os.path.join(out_dir, REPORT_HTML)
    with open(paths["html"], "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return paths


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
    "h1{margin-bottom:.3em}h2{font-size:1.1em;margin-top:1.6em}"
    "table{border-collapse:collapse;font-size:.9em}"
    "th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}"
    "img{max-width:100%}.note{color:#555;font-size:.9em;margin:.3em 0}.verdict{display:inline-block;color:#fff;padding:4px 12px;"
    "border-radius:4px;font-weight:bold}"
    ".grid{display:flex;flex-wrap:wrap;gap:0 2em}.grid section{flex:0 1 auto}"
)
