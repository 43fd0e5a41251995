"""Claims tables: a published claim beside gradlab's value, computed from the stored records.

An experiment spec declares its claims (``experiments/*.toml``)::

    [[claim]]
    claim = "The first of three hidden layers learns slowest"
    source = "Nielsen (2015), ch. 5, 'The vanishing gradient problem'"
    published = 0.012                 # a number, or a text such as "1.64 %"
    measure = "grad_at_layer"         # one of MEASURES
    runs = { depth = 5 }              # which runs (config columns; a list matches any value)
    column = "grad_bias_norm"         # the measure's own keys (see MEASURES)
    layer = 0
    expect = { within = 0.5 }         # within (relative to published), below, above, between
    differs = "why, when it does not hold"   # optional

Each claim's value is the mean ± sd over the matching complete runs of a per-run number; the
verdict is "holds" when the mean meets ``expect``, else "differs because …" (with ``differs``)
or "does not hold". Nothing in the table is typed in by hand but the claim, its source, the
published value and the reason.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import GradlabError

CLAIM_KEYS = ("claim", "source", "published", "measure", "runs", "expect", "differs", "column",
              "layer", "of_layer", "step", "quantity", "stat", "q", "scale")
EXPECTATIONS = ("within", "below", "above", "between")
CLAIM_COLUMNS = ("claim", "source", "published", "mean", "sd", "runs", "gradlab", "verdict")


class ClaimError(GradlabError, ValueError):
    """A claim is invalid; the message is one line naming the key."""


def resolve_layer(layer: int, depth: int) -> int:
    """A layer number; negative counts from the output (-1: the output layer)."""
    return layer if layer >= 0 else depth + layer


def at_step(frame: pd.DataFrame, values: pd.Series, step: Any) -> pd.Series:
    """Per run: ``values`` (indexed like ``frame``) at ``step`` (an int), its ``median`` over the
    recorded steps, or at the ``last`` recorded step."""
    data = frame[["run_id", "step"]].assign(value=values.to_numpy())
    if step == "median":
        return data.groupby("run_id")["value"].median()
    if step == "last":
        return data.sort_values("step").groupby("run_id")["value"].last()
    return data[data["step"] == int(step)].groupby("run_id")["value"].first()


def layer_rows(grads: pd.DataFrame, layer: int) -> pd.DataFrame:
    rows = grads[grads["layer"] == [resolve_layer(layer, d) for d in grads["depth"]]]
    return rows.reset_index(drop=True)


def grad_at_layer(results, claim: dict) -> pd.Series:
    """``column`` (default grad_weight_norm) of ``layer`` at ``step`` (default 0)."""
    rows = layer_rows(results.grads, claim.get("layer", 0))
    column = claim.get("column", "grad_weight_norm")
    return at_step(rows, rows[column], claim.get("step", 0))


def layer_ratio(results, claim: dict) -> pd.Series:
    """``column`` of ``layer`` over that of ``of_layer`` (default -1), per step, at ``step``."""
    column = claim.get("column", "grad_weight_norm")
    a = layer_rows(results.grads, claim.get("layer", 0))[["run_id", "step", column]]
    b = layer_rows(results.grads, claim.get("of_layer", -1))[["run_id", "step", column]]
    pairs = a.merge(b, on=["run_id", "step"], suffixes=("_a", "_b"))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = pairs[f"{column}_a"] / pairs[f"{column}_b"]
    return at_step(pairs, ratio.where(np.isfinite(ratio)), claim.get("step", 0))


def layer_product(results, claim: dict) -> pd.Series:
    """The product of ``column`` (default act_grad_mean, the mean f') over the layers from
    ``layer`` (default 0) up to, not including, ``of_layer`` (default -1), at ``step``: the
    factor the activations' slopes alone put between the two layers' dL/dz."""
    grads = results.grads
    first = np.asarray([resolve_layer(claim.get("layer", 0), d) for d in grads["depth"]])
    stop = np.asarray([resolve_layer(claim.get("of_layer", -1), d) for d in grads["depth"]])
    rows = grads[(grads["layer"] >= first) & (grads["layer"] < stop)]
    column = claim.get("column", "act_grad_mean")
    product = rows.groupby(["run_id", "step"])[column].prod(min_count=1).reset_index()
    return at_step(product, product[column], claim.get("step", 0))


def variance_factor(results, claim: dict) -> pd.Series:
    """The per-layer factor by which the variance of ∂L/∂z (``grad_output_norm``² over the
    layer's units) changes from ``of_layer`` (default -2) down to ``layer`` (default 1):
    (var_layer / var_of_layer)^(1 / (of_layer − layer)), at ``step``. He et al. (2015): 1/2 per
    layer with Xavier's init in a ReLU net, 1 with theirs."""
    grads = results.grads
    widths = {r: [int(w) for w in str(ws).split(",")] for r, ws in
              results.runs[["run_id", "widths"]].itertuples(index=False)}
    parts = []
    for key, default in (("layer", 1), ("of_layer", -2)):
        rows = layer_rows(grads, claim.get(key, default))
        units = [(widths[r] + [10])[layer] for r, layer in zip(rows["run_id"], rows["layer"],
                                                                 strict=True)]
        parts.append(rows.assign(var=rows["grad_output_norm"] ** 2 / np.asarray(units),
                                 layer_index=rows["layer"]))
    pairs = parts[0].merge(parts[1], on=["run_id", "step"], suffixes=("_a", "_b"))
    gap = (pairs["layer_index_b"] - pairs["layer_index_a"]).to_numpy(float)
    factor = (pairs["var_a"] / pairs["var_b"]) ** (1 / gap)
    return at_step(pairs, factor, claim.get("step", 0))


def final_test(results, claim: dict) -> pd.Series:
    """The last epoch's test accuracy, in % (``stat = "error"``: 100 − accuracy)."""
    rows = results.epochs[results.epochs["split"] == "test"].sort_values("epoch")
    accuracy = 100 * rows.groupby("run_id")["accuracy"].last()
    return 100 - accuracy if claim.get("stat", "accuracy") == "error" else accuracy


def dist_stat(results, claim: dict) -> pd.Series:
    """A distribution statistic of ``quantity`` (default activation) at ``layer``: ``stat``
    ``quantile`` (level ``q``), ``mean`` or ``std``, at ``step``; with ``of_layer``, its ratio
    to the same statistic of that layer."""
    dists = results.dists
    if dists.empty:
        raise ClaimError("measure dist_stat needs distribution records: set dist_every")
    rows = dists[(dists["quantity"] == claim.get("quantity", "activation"))
                 & (dists["stat"] == claim.get("stat", "quantile"))]
    if claim.get("stat", "quantile") == "quantile":
        rows = rows[np.isclose(rows["q"], claim.get("q", 0.5))]
    value = layer_rows(rows, claim.get("layer", 0))
    value = at_step(value, value["value"], claim.get("step", 0))
    if "of_layer" not in claim:
        return value
    other = layer_rows(rows, claim["of_layer"])
    return value / at_step(other, other["value"], claim.get("step", 0))


MEASURES: dict[str, Callable] = {
    "grad_at_layer": grad_at_layer, "layer_ratio": layer_ratio, "layer_product": layer_product,
    "variance_factor": variance_factor, "final_test": final_test, "dist_stat": dist_stat,
}


# What a claim's own keys may hold. A wrongly typed one is an error of load_spec, before any
# run trains, not a traceback after the sweep.
GRAD_COLUMNS = ("grad_output_norm", "grad_weight_norm", "grad_bias_norm", "weight_norm",
                "update_ratio", "applied_update_ratio", "act_grad_mean", "saturated_frac",
                "dead_frac", "loss")  # the numbers of grads.parquet
QUANTITIES = ("activation", "grad_output", "grad_weight")  # dists.parquet's
STATS = {"final_test": ("accuracy", "error"), "dist_stat": ("quantile", "mean", "std")}
STEPS = ("median", "last")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_claim(claim: Any, columns: tuple[str, ...]) -> dict:
    """Validate one [[claim]] table; raises ClaimError naming the claim and its first bad
    key."""
    if not isinstance(claim, dict):
        raise ClaimError("a [[claim]] must be a table")
    try:
        return check_keys(claim, columns)
    except ClaimError as e:
        name = claim.get("claim")
        if isinstance(name, str) and name.strip():
            short = " ".join(name.split())
            short = short if len(short) <= 50 else short[:49] + "…"
            raise ClaimError(f"{short!r}: {e}") from None
        raise


def check_keys(claim: dict, columns: tuple[str, ...]) -> dict:
    bad = sorted(set(claim) - set(CLAIM_KEYS))
    if bad:
        raise ClaimError(f"unknown key {bad[0]!r}: allowed are {', '.join(CLAIM_KEYS)}")
    for key in ("claim", "source", "measure", "expect"):
        if key not in claim:
            raise ClaimError(f"needs {key!r}")
    for key in ("claim", "source", "differs", "measure", "quantity", "stat"):
        if key in claim and not isinstance(claim[key], str):
            raise ClaimError(f"{key}={claim[key]!r} is invalid: a string")
    if claim["measure"] not in MEASURES:
        raise ClaimError(f"measure={claim['measure']!r} is invalid: one of {', '.join(MEASURES)}")
    runs = claim.get("runs", {})
    if not isinstance(runs, dict) or any(k not in columns for k in runs):
        raise ClaimError(f"runs={runs!r} is invalid: a table of config columns "
                         f"({', '.join(columns)})")
    for key, value in runs.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, (str, int, float, bool)) for v in values):
            raise ClaimError(f"runs.{key}={value!r} is invalid: a value or a list of values")
    check_expect(claim)
    check_options(claim)
    return claim


def check_expect(claim: dict) -> None:
    """``expect``: one of EXPECTATIONS with a bound of its kind; ``published`` a number or a
    text (a nonzero number for ``within``, which is relative to it)."""
    expect = claim["expect"]
    if not isinstance(expect, dict) or len(expect) != 1 or next(iter(expect)) not in EXPECTATIONS:
        raise ClaimError(f"expect={expect!r} is invalid: one of {', '.join(EXPECTATIONS)}, "
                         f"e.g. {{ within = 0.5 }} or {{ below = 0.1 }}")
    kind, bound = next(iter(expect.items()))
    published = claim.get("published")
    if published is not None and not (is_number(published) or isinstance(published, str)):
        raise ClaimError(f"published={published!r} is invalid: a number or a text")
    if kind == "between":
        if not (isinstance(bound, list) and len(bound) == 2 and all(map(is_number, bound))
                and bound[0] <= bound[1]):
            raise ClaimError(f"expect.between={bound!r} is invalid: two numbers, low then "
                             f"high, e.g. {{ between = [0.9, 0.95] }}")
    elif not is_number(bound) or (kind == "within" and bound < 0):
        raise ClaimError(f"expect.{kind}={bound!r} is invalid: "
                         f"{'a number of at least 0' if kind == 'within' else 'a number'}")
    if kind == "within" and not (is_number(published) and published != 0):
        raise ClaimError(f"expect.within needs a numeric published value other than 0 "
                         f"(published={published!r})")


def check_options(claim: dict) -> None:
    """The measure's own keys: layers are integers, steps an integer of at least 0 or one of
    STEPS, ``column`` a recorded column, ``scale`` and ``q`` numbers."""
    for key in ("layer", "of_layer"):
        if key in claim and not is_int(claim[key]):
            raise ClaimError(f"{key}={claim[key]!r} is invalid: an integer (negative counts "
                             f"from the output layer, -1 is the last)")
    step = claim.get("step", 0)
    if not ((is_int(step) and step >= 0) or step in STEPS):
        raise ClaimError(f"step={step!r} is invalid: an integer of at least 0, or one of "
                         f"{', '.join(STEPS)}")
    if "scale" in claim and not is_number(claim["scale"]):
        raise ClaimError(f"scale={claim['scale']!r} is invalid: a number")
    if "q" in claim and not (is_number(claim["q"]) and 0 <= claim["q"] <= 1):
        raise ClaimError(f"q={claim['q']!r} is invalid: a number from 0 to 1")
    if "column" in claim and claim["column"] not in GRAD_COLUMNS:
        raise ClaimError(f"column={claim['column']!r} is invalid: one of "
                         f"{', '.join(GRAD_COLUMNS)}")
    if "quantity" in claim and claim["quantity"] not in QUANTITIES:
        raise ClaimError(f"quantity={claim['quantity']!r} is invalid: one of "
                         f"{', '.join(QUANTITIES)}")
    stats = STATS.get(claim["measure"])
    if "stat" in claim and stats is not None and claim["stat"] not in stats:
        raise ClaimError(f"stat={claim['stat']!r} is invalid for {claim['measure']}: one of "
                         f"{', '.join(stats)}")


def matching_runs(runs: pd.DataFrame, where: dict) -> list[str]:
    """Run ids of complete runs whose config matches ``where`` (a list matches any value)."""
    mask = runs["status"] == "complete"
    for key, value in where.items():
        values = value if isinstance(value, list) else [value]
        mask &= runs[key].astype(str).isin([str(v) for v in values])
    return list(runs.loc[mask, "run_id"])


def verdict(claim: dict, mean: float) -> str:
    kind, bound = next(iter(claim["expect"].items()))
    if math.isnan(mean):
        return "no runs to measure"
    holds = {
        "within": lambda: abs(mean / claim["published"] - 1) <= bound,
        "below": lambda: mean < bound,
        "above": lambda: mean > bound,
        "between": lambda: bound[0] <= mean <= bound[1],
    }[kind]()
    if holds:
        return "holds"
    return f"differs because {claim['differs']}" if claim.get("differs") else "does not hold"


def number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def evaluate_claims(claims: list[dict], results) -> pd.DataFrame:
    """One row per claim: its text, source, published value, gradlab's mean, sd and number of
    runs, the formatted value and the verdict."""
    rows = []
    for claim in claims:
        ids = matching_runs(results.runs, claim.get("runs", {}))
        values = MEASURES[claim["measure"]](results, claim).reindex(ids).dropna()
        values = values * claim.get("scale", 1.0)
        mean = float(values.mean()) if len(values) else math.nan
        sd = float(values.std()) if len(values) > 1 else math.nan
        text = number(mean) + ("" if math.isnan(sd) else f" ± {number(sd)}")
        rows.append({"claim": claim["claim"], "source": claim["source"],
                     "published": str(claim.get("published", "")), "mean": mean, "sd": sd,
                     "runs": len(values), "gradlab": f"{text} (n={len(values)})",
                     "verdict": verdict(claim, mean)})
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def claims_markdown(table: pd.DataFrame) -> str:
    """The claims table as a Markdown table (mean ± sd over the seeds, n runs)."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| claim | source | published | gradlab (mean ± sd over seeds) | verdict |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {cell(r.claim)} | {cell(r.source)} | {cell(r.published)} | "
              f"{cell(r.gradlab)} | {cell(r.verdict)} |" for r in table.itertuples()]
    return "\n".join(lines) + "\n"


CLAIMS_LIMIT = 16 * 2**20  # bytes of claims.csv read: gradlab writes one short row per claim


def read_claims(path: Path) -> pd.DataFrame | None:
    """The claims table ``gradlab figures`` wrote (``CLAIM_COLUMNS``), or None when there is
    none; a file that is not one (empty, other columns, not a regular file, not CSV) is a
    one-line warning and None."""
    import io
    import warnings

    from .validate import Damaged, read_bytes, reason

    try:
        path.lstat()
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"{path}: unreadable ({reason(e)}); the claims are left out", stacklevel=3)
        return None
    try:
        data = read_bytes(path, CLAIMS_LIMIT)
        table = pd.read_csv(io.BytesIO(data), keep_default_na=False, dtype=str)
    except Damaged as e:
        problem = str(e).removeprefix(path.name + " ")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        problem = f"not a CSV table ({reason(e)})"
    else:
        missing = [c for c in CLAIM_COLUMNS if c not in table.columns]
        if not missing:
            return table
        problem = f"no column {', '.join(missing)}"
    warnings.warn(f"{path}: {problem}: expected the columns {', '.join(CLAIM_COLUMNS)} as "
                  f"gradlab figures writes them; the claims are left out", stacklevel=3)
    return None


def claims_section(results_dir: Path) -> str:
    """The report's claims section: ``claims.csv`` written by ``gradlab figures`` ("" if the
    folder has none, or none with a claim)."""
    table = read_claims(Path(results_dir) / "claims.csv")
    if table is None or table.empty:  # a spec without claims: no section, not an empty table
        return ""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in ("claim", "source", "published",
                                                   "gradlab (mean ± sd over seeds)", "verdict"))
    body = "".join(
        "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in
                         (r.claim, r.source, r.published, r.gradlab, r.verdict)) + "</tr>"
        for r in table.itertuples())
    return (f"<h2>What the literature says, checked</h2>"
            f"<table><tr>{head}</tr>{body}</table>")
