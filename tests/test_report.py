"""The HTML report: every figure embedded, tables that hold the numbers of the records (computed
here again from the Parquet files), each run's status and the provenance."""

from __future__ import annotations

import base64
import inspect
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from gradlab.plots import FIGURES
from gradlab.report import write_report

from .helpers import invoke


@pytest.fixture(scope="module")
def page(trained) -> str:
    """The report of the session's results folder (conftest's ``trained``)."""
    path = write_report(trained)
    assert path == trained / "report.html"
    return path.read_text(encoding="utf-8")


def records_by_hand(results: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Each run's config, grads and epochs read straight from its files, not via gradlab."""
    runs, grads, epochs = [], [], []
    for run in sorted((results / "runs").iterdir()):
        config = json.loads((run / "config.json").read_text())["config"]
        status = json.loads((run / "status.json").read_text())
        runs.append(dict(run_id=run.name, activation=config["activation"],
                         depth=config["depth"], lr=config["lr"], status=status["status"]))
        grads.append(pq.read_table(run / "grads.parquet").to_pandas())
        epochs.append(pq.read_table(run / "epochs.parquet").to_pandas())
    return pd.DataFrame(runs), pd.concat(grads), pd.concat(epochs)


def test_write_report_signature_is_the_one_sweep_calls():
    assert list(inspect.signature(write_report).parameters) == ["results_dir"]


def test_report_is_self_contained_and_embeds_every_figure(page):
    images = re.findall(r"<figure id='(\w+)' class='[\w ]*'><img alt='[^']*' "
                        r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", page)
    names = [name for name, _ in images]
    assert names[0] == "vanishing_ratio", "the headline figure leads"
    assert sorted(names) == sorted(FIGURES)
    for _, data in images:
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<script" not in page and "<link" not in page and "http" not in page


def test_accuracy_table_holds_mean_and_sd_of_the_records(trained, page):
    runs, _, epochs = records_by_hand(trained)
    test = epochs[epochs["split"] == "test"].sort_values("epoch").groupby("run_id").tail(1)
    final = test.merge(runs, on="run_id")
    complete = final[final["status"] == "complete"]
    stats = complete.groupby(["activation", "depth"])["accuracy"].agg(["mean", "std", "count"])
    assert len(stats) == 4
    for (activation, depth), row in stats.iterrows():
        cell = f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f} % (n={int(row['count'])})"
        assert cell in page, (activation, depth, cell)
    assert "no complete run; 1 diverged" in page  # the lr=1e30 run: counted, not averaged


def test_vanishing_table_holds_the_ratios_of_the_records(trained, page):
    runs, grads, _ = records_by_hand(trained)
    grads = grads.merge(runs, on="run_id")
    first = grads[grads["layer"] == 0].set_index(["run_id", "step"])["grad_weight_norm"]
    last = grads[grads["layer"] == grads["depth"] - 1] \
        .set_index(["run_id", "step"])["grad_weight_norm"]
    ratio = (first / last).replace([np.inf, -np.inf], np.nan).dropna()
    per_run = ratio[ratio > 0].groupby(level="run_id").median().rename("ratio")
    per_run = runs.set_index("run_id").join(per_run)
    ok = per_run[per_run["lr"] < 1]
    geo = ok.groupby(["activation", "depth"])["ratio"].apply(lambda v: np.exp(np.log(v).mean()))
    for (activation, depth), value in geo.items():
        assert f"{value:.3g} [" in page, (activation, depth, value)
    for run_id, row in per_run.iterrows():  # every run's own ratio is in the runs table
        assert re.search(rf"<td>{run_id}</td>.*?<td>{row['ratio']:.3g}</td>", page), run_id
    assert "0.25^(depth−1): max σ′ multiplied over the layers" in page
    text = re.sub(r"data:image/png;base64,[^']*", "", page)  # the words, not the pictures
    assert "<td>0.0625</td>" in page and "bound" not in text.lower()


def test_runs_table_shows_status_and_provenance(trained, page):
    runs, _, _ = records_by_hand(trained)
    (diverged,) = runs.loc[runs["status"] == "diverged", "run_id"]
    row = re.search(rf"<tr class='diverged'><td>{diverged}</td>.*?</tr>", page)
    assert row and "<td>diverged</td>" in row.group(0)
    status = json.loads((trained / "runs" / diverged / "status.json").read_text())
    assert f"<td>{status['diverged_step']}</td>" in row.group(0)
    assert page.count("<td>complete</td>") == (runs["status"] == "complete").sum()
    provenance = json.loads((trained / "runs" / diverged / "config.json").read_text())
    for key in ("torch", "numpy", "python"):
        assert f"<td>{provenance['provenance'][key]}</td>" in page
    assert "<td>git_sha</td>" in page and "<td>init</td>" in page


# the page drawn again (the fixture above drew it); the command runs fast in test_integrity,
# test_safety and test_watch_reports
@pytest.mark.slow
def test_report_command_writes_the_page(trained):
    r = invoke("report", trained)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(trained / "report.html")


@pytest.mark.parametrize("make", ["missing", "file", "not_results"])
def test_report_bad_path_is_one_line(make, tmp_path):
    path = tmp_path / "p"
    if make == "file":
        path.write_text("x")
    elif make == "not_results":
        path.mkdir()
    r = invoke("report", path)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and str(path) in lines[0]
    assert not (tmp_path / "p" / "report.html").exists()


@pytest.mark.slow  # fault injection: a page drawn again for two damaged runs
def test_report_warns_about_damaged_runs_and_lists_them(trained, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(trained, copy)
    runs = sorted((copy / "runs").iterdir())
    (runs[0] / "epochs.parquet").write_bytes(b"junk")
    (runs[1] / "config.json").write_text("{")
    r = invoke("report", copy)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2, r.stderr
    page = (copy / "report.html").read_text(encoding="utf-8")
    assert "<h2>Problems</h2>" in page and "epochs.parquet unreadable" in page
    assert "config.json unreadable" in page
