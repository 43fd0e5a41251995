"""The report's words and tables for any model (``gradlab.watch``, a framework callback): what
was watched, each layer's gradient and update ratio by name, the logged metrics, and the user's
own config; nothing that assumes a depth, an activation or a sigmoid."""

from __future__ import annotations

import html
import math
from collections import Counter

import numpy as np
import pandas as pd

from .plots import Prepared
from .plots.model import layer_order

RATIO_WORDS = ((0.01, "far below 1: the layers near the input get little gradient (vanishing "
                      "toward the input)"),
               (100.0, "within a factor of 100 of 1: no vanishing or exploding toward the "
                       "input"),
               (math.inf, "far above 1: the gradient grows toward the input (exploding)"))
STILL, JUMPY = 1e-5, 0.1  # an update ratio below STILL barely moves a layer; above JUMPY, a lot


def number(value: float) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{value:.3g}"


def medians(grads: pd.DataFrame, run_id: str, column: str) -> pd.Series:
    """Per layer name (forward order): the median of ``column`` over the run's recorded
    steps, NaN where it has no finite value."""
    rows = grads[grads["run_id"] == run_id]
    names = layer_order(rows)
    values = rows[column].astype(float).where(np.isfinite(rows[column].astype(float)))
    by_name = values.groupby(rows["layer_name"].astype(str)).median()
    return by_name.reindex(names)


def watched(meta: dict) -> dict:
    about = meta.get("watched")
    return about if isinstance(about, dict) else {}


def optimizer_names(meta: dict) -> str:
    types = [o.get("type") for o in watched(meta).get("optimizers") or [] if isinstance(o, dict)]
    return ", ".join(str(t) for t in types if t) or "—"


def layers_text(meta: dict) -> str:
    """"gru (GRU), fc (Linear, then tanh), head (Linear)" from a run's description."""
    parts = []
    for layer in watched(meta).get("layers") or []:
        if not isinstance(layer, dict):
            continue
        then = f", then {layer['activation']}" if layer.get("activation") else ""
        parts.append(f"{layer.get('layer_name')} ({layer.get('type')}{then})")
    return ", ".join(parts)


def last_logged(metrics: pd.DataFrame, run_id: str) -> str:
    """"train loss 0.91 (step 119); test accuracy 0.83 (step 119)": each metric's last value."""
    if metrics.empty:
        return ""
    rows = metrics[(metrics["run_id"] == run_id) & np.isfinite(metrics["value"].astype(float))]
    last = rows.sort_values("step", kind="stable").groupby(["split", "metric"], sort=True).tail(1)
    return "; ".join(f"{r.split} {r.metric} {number(r.value)} (step {int(r.step)})"
                     for r in last.itertuples())


def ratio_words(ratio: float) -> str:
    return next(words for bound, words in RATIO_WORDS if ratio < bound)


def run_story(data: Prepared, run_id: str) -> str:
    """One run in plain words, from its stored records."""
    meta = data.metas.get(run_id, {})
    grad = medians(data.grads, run_id, "grad_weight_norm")
    steps = data.grads.loc[data.grads["run_id"] == run_id, "step"].nunique()
    total = watched(meta).get("steps")
    head = (f"{run_id} ({optimizer_names(meta)}; {total if total is not None else '?'} optimizer "
            f"steps, {steps} recorded)")
    if grad.dropna().empty:
        return f"{head}: no finite gradient norm was recorded."
    first, last = grad.index[0], grad.index[-1]
    parts = [f"median ‖∂L/∂W‖ {number(grad.iloc[0])} at {first} (input side) and "
             f"{number(grad.iloc[-1])} at {last} (output side)"]
    if len(grad) > 1 and grad.iloc[-1] > 0:
        ratio = grad.iloc[0] / grad.iloc[-1]
        parts.append(f"first/last {number(ratio)}, {ratio_words(ratio)}")
        low = grad.idxmin()
        if low not in (first, last):
            parts.append(f"smallest at {low} ({number(grad.min())})")
    update = medians(data.grads, run_id, "update_ratio").dropna()
    if not update.empty:
        text = (f"update ratio ‖ΔW‖/‖W‖ from {number(update.min())} ({update.idxmin()}) to "
                f"{number(update.max())} ({update.idxmax()})")
        still = list(update[update < STILL].index)
        jumpy = list(update[update > JUMPY].index)
        if still:
            text += f"; below {STILL:g}, barely moving: {', '.join(still)}"
        if jumpy:
            text += f"; above {JUMPY:g}, changing by more than a tenth a step: {', '.join(jumpy)}"
        parts.append(text)
    logged = last_logged(data.metrics, run_id)
    if logged:
        parts.append(f"last logged: {logged}")
    return f"{head}: " + "; ".join(parts) + "."


def story_section(data: Prepared) -> str:
    items = "".join(f"<li>{html.escape(run_story(data, r))}</li>" for r in data.runs["run_id"])
    return ("<h2>In plain words</h2><p class='note'>Per run, from the stored records: each "
            "layer's gradient norm ‖∂L/∂W‖ and update ratio ‖ΔW‖/‖W‖ as the median over its "
            "recorded steps, layers in forward order, and the last value of each logged "
            f"metric.</p><ul class='story'>{items}</ul>")


def layers_table(data: Prepared) -> pd.DataFrame:
    """One row per run and layer: what it is and the medians over its recorded steps."""
    rows = []
    several = data.runs["run_id"].nunique() > 1
    for run_id in data.runs["run_id"]:
        meta = data.metas.get(run_id, {})
        kinds = {str(layer.get("layer_name")): layer for layer in watched(meta).get("layers") or []
                 if isinstance(layer, dict)}
        columns = {c: medians(data.grads, run_id, c) for c in
                   ("grad_weight_norm", "update_ratio", "act_grad_mean", "weight_norm")
                   if c in data.grads}
        if not columns:
            continue
        for name in next(iter(columns.values())).index:
            about = kinds.get(name, {})
            row = {"run": run_id} if several else {}
            row.update({"layer": name, "type": about.get("type"),
                        "activation after": about.get("activation")})
            for column, label in (("grad_weight_norm", "‖∂L/∂W‖"),
                                  ("update_ratio", "‖ΔW‖/‖W‖"),
                                  ("act_grad_mean", "mean f′"), ("weight_norm", "‖W‖")):
                if column in columns:
                    row[label] = number(columns[column].get(name, math.nan))
            rows.append(row)
    return pd.DataFrame(rows)


def layers_section(data: Prepared, html_table) -> str:
    table = layers_table(data)
    if table.empty:
        return ""
    return ("<h2>Layers</h2><p class='note'>Each recorded layer in forward order: its module "
            "type, the activation known to follow it (none named: its f′ is not recorded), and "
            "the median over recorded steps of its gradient norm, update ratio, mean f′ and "
            "weight norm.</p>" + html_table(table))


def user_config(data: Prepared) -> dict[str, Counter]:
    """Per key of the users' own configs: its values over the runs (as text)."""
    keys: dict[str, Counter] = {}
    for run_id in data.runs["run_id"]:
        config = data.metas.get(run_id, {}).get("config")
        for key, value in (config if isinstance(config, dict) else {}).items():
            keys.setdefault(str(key), Counter())[str(value)] += 1
    return keys


def what_was_run(data: Prepared, head: str) -> str:
    """The lead paragraph (HTML): runs, the user's settings every run shares and those that
    vary, and what was watched."""
    esc = html.escape
    config = user_config(data)
    count = len(data.runs)
    same = [f"{k} {next(iter(v))}" for k, v in config.items() if len(v) == 1
            and sum(v.values()) == count]
    varied = [f"{k} {', '.join(sorted(v))}" for k, v in config.items()
              if not (len(v) == 1 and sum(v.values()) == count)]
    watched_text = sorted({layers_text(m) for m in data.metas.values() if layers_text(m)})
    optimizers = sorted({optimizer_names(m) for m in data.metas.values()})
    return (head + (f" Every run: {esc(', '.join(same))}." if same else "")
            + (f" Varied: {esc('; '.join(varied))}." if varied else "")
            + (f" Layers recorded: {esc(' | '.join(watched_text))}." if watched_text else "")
            + (f" Optimizer: {esc(', '.join(optimizers))}." if optimizers else ""))


def runs_table(data: Prepared) -> pd.DataFrame:
    rows = []
    for run in data.runs.itertuples():
        meta = data.metas.get(run.run_id, {})
        rows.append({"run_id": run.run_id, "status": run.status,
                     "optimizer": optimizer_names(meta),
                     "optimizer steps": watched(meta).get("steps"),
                     "recorded steps": int(data.grads.loc[data.grads["run_id"] == run.run_id,
                                                          "step"].nunique()),
                     "last logged": last_logged(data.metrics, run.run_id) or None,
                     "error": getattr(run, "error", None)})
    return pd.DataFrame(rows)


def config_rows(data: Prepared, listing) -> list[dict]:
    """The provenance table's config rows: the users' own keys with their values."""
    return [{"field": key, "value (runs)": listing(values)}
            for key, values in user_config(data).items()]
