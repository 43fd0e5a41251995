"""The HTML report of a results folder, read as a short paper: what was run and what it shows in
plain words, the headline figure, the tables, the other figures, each run's status and the
provenance; one self-contained page (figures embedded as PNG)."""

from __future__ import annotations

import base64
import html
import math
import os
from collections import Counter
from pathlib import Path

import pandas as pd

from . import __version__, report_model
from .claims import claims_section
from .config import CONFIG_FIELDS
from .plots import Prepared, figures, prepare, render
from .plots.catalog import run_meta
from .store import atomic_write, load
from .tables import SIGMOID_MAX_SLOPE, table_keys, vanishing_table, verdict

PROVENANCE_KEYS = ("gradlab", "git_sha", "torch", "numpy", "pandas", "pyarrow", "python",
                   "platform", "device", "threads", "argv")
MAX_VALUES = 4  # distinct provenance values listed before "+N more"
HEADLINE = ("vanishing_ratio", "accuracy_by_epoch")  # the first of these drawn leads the page
MODEL_HEADLINE = ("layer_profile", "grad_norm_over_steps")  # ... of a report on any model
FIGURE_DPI = 300  # crisp at the page's width on a high-density screen
WIDE = 5.0  # inches: a figure at least this wide spans both columns of the page
# What "what was run" says about each setting that is the same in every run.
SETTINGS = ("dataset", "width", "widths", "optimizer", "lr", "momentum", "weight_decay",
            "batch_size", "epochs", "train_size", "clip_grad_norm", "log_every")

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1000px; padding: 0 1em; color: #222; }
p.lead { font-size: 1.05em; } ul.story li { margin: .3em 0; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
tr.diverged td { background: #fdecea; } tr.failed td { background: #fff4e0; }
tr.unfinished td { color: #888; }
.note { color: #555; font-size: .92em; } .problems li { color: #a33; }
figure { margin: 1.5em 0; } figure img { width: 100%; height: auto; display: block; }
.figures { display: grid; grid-template-columns: 1fr 1fr; gap: 0 2em; }
.figures figure.wide { grid-column: 1 / -1; } figure.headline { margin-top: 1em; }
figcaption { color: #555; font-size: .92em; }
code { font-size: .92em; }
"""


def write_report(results_dir: str | os.PathLike) -> Path:
    """Write ``results_dir/report.html`` and return its path.

    Args:
        results_dir: a folder made by gradlab (``<dir>/runs/<run_id>/``) or one run folder.

    Problems that ``gradlab.load`` reports (damaged files, unfinished runs) are warnings and
    are listed in the page; a path that is not a results folder raises StoreError.
    """
    results_dir = Path(results_dir)
    data = prepare(load(results_dir), results_dir)
    page = render_report(data, results_dir)
    path = results_dir / "report.html"
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def render_report(data: Prepared, results_dir: Path) -> str:
    """The report page of prepared results as one HTML string."""
    esc = html.escape
    drawn = dict(figures(data))
    model = data.kind == "model"  # any model but gradlab's own MLPs: layers by name
    headline = next((name for name in (MODEL_HEADLINE if model else HEADLINE) if name in drawn),
                    None)
    lead = (report_model.what_was_run(data, runs_line(data.runs, results_dir)) if model
            else what_was_run(data.runs, results_dir))
    sections = [
        f"<h1>gradlab report: {esc(results_dir.resolve().name)}</h1>",
        f"<p class='lead'>{lead}</p>",
    ]
    if data.problems:
        items = "".join(f"<li>{esc(p)}</li>" for p in data.problems)
        sections.append(f"<h2>Problems</h2><ul class='problems'>{items}</ul>")
    sections.append(report_model.story_section(data) if model else story_section(data))
    if headline is not None:
        sections.append(figure_html(headline, drawn.pop(headline), data, "headline"))
    if model:
        sections += [report_model.layers_section(data, html_table),
                     figures_section(drawn, data),
                     "<h2>Runs</h2>" + html_table(report_model.runs_table(data)),
                     provenance_section(data, results_dir)]
    else:
        sections += [claims_section(results_dir), accuracy_section(data),
                     vanishing_section(data), figures_section(drawn, data), runs_section(data),
                     provenance_section(data, results_dir)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>gradlab report: {esc(results_dir.resolve().name)}</title>"
            f"<style>{STYLE}</style></head><body>\n"
            + "\n".join(s for s in sections if s)
            + f"\n<p class='note'>Made by gradlab {esc(__version__)} from the stored records."
              "</p>\n</body></html>\n")


def summary(runs: pd.DataFrame) -> str:
    counts = Counter(runs["status"])
    parts = [f"{counts[s]} {s}" for s in ("complete", "diverged", "failed", "unfinished")
             if counts[s]]
    return f"{len(runs)} run{'s' if len(runs) != 1 else ''}: {', '.join(parts)}"


def what_was_run(runs: pd.DataFrame, results_dir: Path) -> str:
    """A paragraph (HTML) saying what was trained: the settings every run shares, and the
    values that vary between runs."""
    esc = html.escape
    varying = [k for k in (*table_keys(runs), "seed") if k in runs.columns]
    same = [k for k in SETTINGS if k in runs.columns and k not in varying
            and runs[k].notna().all() and runs[k].astype(object).map(cell_text).nunique() == 1]
    shared = ", ".join(f"{k} {cell_text(runs[k].iloc[0])}" for k in same)
    varied = "; ".join(f"{k} {', '.join(sorted_values(runs[k]))}" for k in varying)
    return (runs_line(runs, results_dir)
            + (f" Every run: {esc(shared)}." if shared else "")
            + (f" Varied: {esc(varied)}." if varied else ""))


def runs_line(runs: pd.DataFrame, results_dir: Path) -> str:
    """"1 run: 1 complete in <code>DIR</code>." (HTML)"""
    return f"{html.escape(summary(runs))} in <code>{html.escape(str(results_dir))}</code>."


def sorted_values(values: pd.Series) -> list[str]:
    """The distinct values of a column as text, numbers in numeric order."""
    return sorted({cell_text(v) for v in values}, key=number_first)


def number_first(text: str) -> tuple:
    """A sort key that orders numbers by value (3 before 10), then other text."""
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def story_section(data: Prepared) -> str:
    lines = verdict(data.grads, data.epochs, data.runs)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return ("<h2>In plain words</h2><p class='note'>Per setup, from the stored records: the "
            "first layer's gradient norm over the last layer's (‖g<sub>first</sub>‖ / "
            "‖g<sub>last</sub>‖; 1 means the input layer gets as much gradient as the output "
            "layer), and the final test accuracy, depth by depth.</p>"
            f"<ul class='story'>{items}</ul>")


# -- tables ------------------------------------------------------------------------------------


def html_table(frame: pd.DataFrame, row_classes: list[str] | None = None) -> str:
    """A plain HTML table of ``frame`` (cells escaped; NaN/None as an em dash)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for i, values in enumerate(frame.itertuples(index=False)):
        cells = "".join(f"<td>{html.escape(cell_text(v))}</td>" for v in values)
        cls = f" class='{row_classes[i]}'" if row_classes and row_classes[i] else ""
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def cell_text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return str(value)


def by_depth(table: pd.DataFrame, cell: pd.Series) -> pd.DataFrame:
    """One row per setup (the table keys except depth), one column per depth."""
    keys = [k for k in table_keys(table) if k != "depth" and k in table.columns]
    wide = table.assign(cell=cell.to_numpy()).pivot(index=keys, columns="depth", values="cell")
    wide.columns = [f"depth {d}" for d in wide.columns]
    return wide.reset_index()


def percent(value: float) -> str:
    return f"{100 * value:.2f}"


def accuracy_cell(row) -> str:
    if row.seeds == 0:
        text = "no complete run"
    elif row.seeds == 1 or math.isnan(row.sd):
        text = f"{percent(row.mean)} % (n=1)"
    else:
        text = f"{percent(row.mean)} ± {percent(row.sd)} % (n={row.seeds})"
    bad = [f"{int(getattr(row, s))} {s}" for s in ("diverged", "failed")
           if int(getattr(row, s, 0) or 0)]
    return text + (f"; {', '.join(bad)}" if bad else "")


def accuracy_section(data: Prepared) -> str:
    table = data.accuracy
    if table.empty:  # no section without a table (the runs' statuses say why)
        return ""
    cells = pd.Series([accuracy_cell(r) for r in table.itertuples()])
    return ("<h2>Final test accuracy</h2>"
            "<p class='note'>Test accuracy after the last epoch: mean ± sd over the seeds of "
            "complete runs (n of them). Diverged and failed runs have no final accuracy; they "
            "are counted, not averaged.</p>" + html_table(by_depth(table, cells)))


def ratio_text(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3g}"


def ratio_cell(row) -> str:
    """Geometric mean [min, max] (n runs); a single run's ratio alone."""
    spread = f" [{ratio_text(row.min)}, {ratio_text(row.max)}]" if row.runs > 1 else ""
    diverged = f"; {row.diverged} diverged" if getattr(row, "diverged", 0) else ""
    return f"{ratio_text(row.geo_mean)}{spread} (n={row.runs}){diverged}"


VANISHING_TITLE = "<h2>Vanishing ratio ‖g<sub>first</sub>‖ / ‖g<sub>last</sub>‖</h2>"


def vanishing_section(data: Prepared) -> str:
    if data.ratios.empty:
        return ""
    if "depth" not in data.runs:  # e.g. a watched model of the user's: no depth to group by
        per_run = pd.DataFrame({"run": data.ratios["run_id"], "vanishing ratio": [
            ratio_text(v) for v in data.ratios["vanishing_ratio"]]})
        return (VANISHING_TITLE + "<p class='note'>Per run: ‖∂L/∂W‖ of its first layer over "
                "that of its last recorded layer at each recorded step, then the median over "
                "steps.</p>" + html_table(per_run))
    table = vanishing_table(data.ratios)
    cells = pd.Series([ratio_cell(r) for r in table.itertuples()])
    wide = by_depth(table, cells).astype(object)  # the row below has no setup values
    product = {f"depth {d}": ratio_text(SIGMOID_MAX_SLOPE ** (d - 1)) for d in table["depth"]}
    first = wide.columns[0]
    wide = pd.concat([wide, pd.DataFrame([{first: "0.25^(depth−1): max σ′ multiplied over "
                                                  "the layers", **product}])],
                     ignore_index=True)
    return (VANISHING_TITLE
            + "<p class='note'>Per run: ‖∂L/∂W‖ of layer 0 over that of layer depth−1 at each "
            "recorded step, then the median over steps. Shown: the geometric mean over seeds "
            "[min, max] (n runs; for one run, its ratio), and the tutorial's number "
            "0.25<sup>depth−1</sup>: the product of σ′'s largest value, 0.25, over the depth−1 "
            "sigmoid layers, the most that σ′ alone lets through. It is no limit on the "
            "ratio, which also carries the weights' norms and each layer's inputs and can lie "
            "above it. Far below 1: the input layers barely learn.</p>"
            + html_table(wide))


def figure_html(name: str, fig, data: Prepared, kind: str = "") -> str:
    png = base64.b64encode(render(fig, "png", dpi=FIGURE_DPI)).decode("ascii")
    caption = html.escape(data.caption(name))
    kind = kind or ("wide" if fig.get_figwidth() >= WIDE else "")
    return (f"<figure id='{name}' class='{kind}'><img alt='{caption}' "
            f"src='data:image/png;base64,{png}'>"
            f"<figcaption>{caption} (<code>{name}</code>)</figcaption></figure>")


def figures_section(drawn: dict, data: Prepared) -> str:
    if not drawn:
        return ""
    return ("<h2>More figures</h2><div class='figures'>"
            + "\n".join(figure_html(name, fig, data) for name, fig in drawn.items())
            + "</div>")


def runs_section(data: Prepared) -> str:
    runs = data.runs
    keys = [k for k in (*table_keys(runs), "seed") if k in runs.columns]
    ratios = data.ratios.set_index("run_id")["vanishing_ratio"] if not data.ratios.empty \
        else pd.Series(dtype=float)
    frame = runs.sort_values([*keys, "run_id"], kind="stable")
    table = frame[["run_id", *keys, "status"]].copy()
    # only a complete run has a final accuracy (a diverged one may have stored the accuracy of
    # an epoch before it diverged; the accuracy table leaves such runs out too)
    table["final test accuracy (%)"] = [
        percent(a) if status == "complete" and a is not None and not math.isnan(a) else None
        for a, status in zip(frame["final_test_accuracy"].astype(float), frame["status"])]
    table["vanishing ratio"] = [ratio_text(ratios.get(r, math.nan)) for r in frame["run_id"]]
    table["diverged at step"] = [None if s is None or s != s else str(int(s))
                                 for s in frame["diverged_step"]]
    table["error"] = frame["error"] if "error" in frame else None
    classes = [s if s in ("diverged", "failed", "unfinished") else "" for s in frame["status"]]
    return ("<h2>Runs</h2><p class='note'>One row per run; diverged and failed runs are marked "
            "and their records end where the run stopped.</p>" + html_table(table, classes))


def provenance_section(data: Prepared, results_dir: Path) -> str:
    values: dict[str, Counter] = {k: Counter() for k in PROVENANCE_KEYS}
    times: list[str] = []
    for run_id in data.runs["run_id"]:
        meta = data.metas.get(run_id) or run_meta(results_dir, run_id)
        prov = meta.get("provenance", {})
        for key in PROVENANCE_KEYS:
            value = prov.get(key)
            values[key][" ".join(value) if isinstance(value, list) else str(value)] += 1
        times += [prov[k] for k in ("started", "finished") if prov.get(k)]
    rows = [{"": key, "value (runs)": listing(counter)} for key, counter in values.items()]
    if times:
        rows.append({"": "time", "value (runs)": f"{min(times)} … {max(times)}"})
    config = []
    for column in [c for c in CONFIG_FIELDS if c in data.runs.columns]:
        counter = Counter(cell_text(v) for v in data.runs[column])
        config.append({"field": column, "value (runs)": listing(counter)})
    if data.kind == "model":  # the users' own keys, whole
        config = report_model.config_rows(data, listing)
    if not config:
        return ("<h2>Provenance</h2><p class='note'>From each run's <code>config.json</code>; "
                "values that differ between runs are listed with their run counts.</p>"
                + html_table(pd.DataFrame(rows)))
    return ("<h2>Provenance</h2><p class='note'>From each run's <code>config.json</code>; "
            "values that differ between runs are listed with their run counts.</p>"
            + html_table(pd.DataFrame(rows)) + "<h3>Config</h3>"
            + html_table(pd.DataFrame(config)))


def listing(counter: Counter) -> str:
    if len(counter) == 1:
        return next(iter(counter))
    items = sorted(counter.items(), key=lambda kv: (-kv[1], number_first(kv[0])))
    text = "; ".join(f"{value} ({n})" for value, n in items[:MAX_VALUES])
    return text + (f"; +{len(items) - MAX_VALUES} more" if len(items) > MAX_VALUES else "")
