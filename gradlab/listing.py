"""The run listing of ``gradlab ls``: one row per run, and one line per damaged or unfinished
run."""

from __future__ import annotations

import os

import pandas as pd

from . import store
from .reader import read_folder

LS_COLUMNS = ("run_id", "status", "engine", "depth", "widths", "activation", "init", "lr", "seed",
              "epochs", "final_test_accuracy", "note")


def list_runs(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """The runs of a results folder (one row each, LS_COLUMNS) and one line per damaged or
    unfinished run, as every reader sees them (``gradlab.reader``). Raises StoreError if
    ``path`` is not a results folder."""
    folder = read_folder(path)
    table = pd.DataFrame([row(run.row()) for run in folder.listed()], columns=list(LS_COLUMNS))
    if not table.empty:
        table = table.sort_values(["depth", "widths", "activation", "init", "lr", "seed",
                                   "run_id"], kind="stable", ignore_index=True)
    return table, folder.problems()


def row(meta: dict) -> dict:
    """A run's row of the listing; the final accuracy only of complete runs (not e.g. that of
    an epoch before a run diverged)."""
    note = ""
    if meta["status"] == "diverged":
        note = f"diverged at step {meta['diverged_step']}"
    elif meta["status"] == "failed":
        note = str(meta.get("error") or "")
    if meta.get("source") == "watch":  # a model of the user's own: its own settings say what it is
        own = [f"{k}={v}" for k, v in meta.items() if k not in store.RUN_KEYS and v is not None]
        note = "; ".join(filter(None, ["watched: " + " ".join(own) if own else "watched", note]))
    out = {**{k: meta.get(k) for k in LS_COLUMNS}, "note": note}
    if meta["status"] != "complete":
        out["final_test_accuracy"] = None
    return out


def one_line(value, width: int = 120):
    """A cell as one printable line: control characters escaped (a config value's terminal
    escapes are not run), cut to ``width`` characters."""
    if not isinstance(value, str):
        return value
    text = value.splitlines()[0] if value.strip() else value
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= width else text[:width - 1] + "…"


def format_runs(table: pd.DataFrame) -> str:
    """The listing as aligned text, accuracy in percent, each cell one printable line."""
    text = table.map(one_line)
    text["final_test_accuracy"] = [
        "" if v is None or v != v else f"{v:.2%}" for v in table["final_test_accuracy"]]
    text = text.rename(columns={"final_test_accuracy": "test_acc"})
    empty = [c for c in text.columns if c not in ("run_id", "status", "note")
             and text[c].isna().all()]  # (e.g. depth of a folder of watched runs only)
    return text.drop(columns=empty).to_string(index=False)
