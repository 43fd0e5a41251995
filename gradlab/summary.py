"""The summary table of a sweep: final test accuracy and vanishing ratio per configuration,
mean and sd over seeds (printed by ``gradlab sweep`` and ``gradlab figures``)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable

import pandas as pd

from . import store


def summary_table(results: store.Results, by: list[str] | None = None) -> pd.DataFrame:
    """Final test accuracy and vanishing ratio per configuration, mean and sd over seeds.

    The per-run numbers are those of the figures and the report (``gradlab.plots``), of
    complete runs only: the final test accuracy, and the vanishing ratio, the median over
    recorded steps of grad_weight_norm(layer 0) / grad_weight_norm(layer depth-1). A diverged
    run is counted in ``diverged``; its partial records are left out of both statistics.

    Args:
        results: ``store.load(out)``.
        by: the config columns that make a configuration; default: activation, depth, and
            any other config (seed excepted) that varies across the runs.

    Returns one row per configuration: the ``by`` columns, ``seeds`` (complete runs),
    ``diverged``, ``failed``, ``test_accuracy_mean``, ``test_accuracy_sd``,
    ``vanishing_ratio_mean``, ``vanishing_ratio_sd`` (an sd is NaN for a single seed).
    """
    from .tables import complete_only, final_accuracy_table, table_keys, vanishing_ratios

    if results.runs.empty or results.epochs.empty:
        return pd.DataFrame()
    by = list(by or table_keys(results.runs))
    table = final_accuracy_table(results.epochs, results.runs, by=by).rename(
        columns={"mean": "test_accuracy_mean", "sd": "test_accuracy_sd"})
    grads = complete_only(results.grads, results.runs)
    if grads.empty:
        return table.assign(vanishing_ratio_mean=math.nan, vanishing_ratio_sd=math.nan)
    ratios = vanishing_ratios(grads).groupby(by, sort=True, dropna=False)
    ratios = ratios["vanishing_ratio"].agg(vanishing_ratio_mean="mean", vanishing_ratio_sd="std")
    return table.merge(ratios.reset_index(), on=by, how="left")


def options_off(table: pd.DataFrame) -> pd.DataFrame:
    """Config options that are unset in a row (e.g. no clip_grad_norm) read "off", not NaN."""
    from .config import CONFIG_FIELDS

    table = table.copy()
    for column in (c for c in CONFIG_FIELDS if c in table.columns):
        if table[column].isna().any():
            table[column] = table[column].astype(object).where(table[column].notna(), "off")
    return table


def format_summary(table: pd.DataFrame) -> str:
    """The summary table as text: ``91.30% ± 0.40`` and ``1.2e-03 ± 3e-04``; unset options
    read "off"."""
    if table.empty:
        return "no finished runs to summarise"
    table = options_off(table)

    def pm(mean: float, sd: float, fmt: Callable[[float], str]) -> str:
        if mean != mean:
            return "n/a"
        return fmt(mean) if sd != sd else f"{fmt(mean)} ± {fmt(sd)}"

    text = table.drop(columns=[c for c in table.columns if c.endswith(("_mean", "_sd"))])
    for column in ("diverged", "failed"):  # only worth a column when there are some
        if column in text and not text[column].any():
            text = text.drop(columns=column)
    text["test accuracy"] = [pm(m, s, lambda v: f"{v:.2%}") for m, s in
                             zip(table["test_accuracy_mean"], table["test_accuracy_sd"])]
    text["vanishing ratio"] = [pm(m, s, lambda v: f"{v:.3g}") for m, s in
                               zip(table["vanishing_ratio_mean"], table["vanishing_ratio_sd"])]
    return text.to_string(index=False)


def sweep_results(out: str | os.PathLike, run_ids: Iterable[str]) -> store.Results:
    """The given runs of a results folder (other runs there are ignored), loaded without
    warnings: the command that asks names damaged runs itself."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return store.load(out, run_ids=run_ids)


def sweep_summary(out: str | os.PathLike, run_ids: Iterable[str]) -> pd.DataFrame:
    """``summary_table`` of the given runs of a results folder (other runs there are ignored)."""
    return summary_table(sweep_results(out, run_ids))


def sweep_verdict(out: str | os.PathLike, run_ids: Iterable[str]) -> list[str]:
    """``gradlab.tables.verdict`` of the given runs of a results folder: what they show, in
    plain words, one line per setup."""
    from .tables import verdict

    results = sweep_results(out, run_ids)
    return verdict(results.grads, results.epochs, results.runs)
