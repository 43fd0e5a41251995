"""``gradlab figures SPEC --check``: an experiment rebuilt (or its existing records read) and
compared with its committed manifest, summary and claims.

"identical" when the records hash matches the committed one. Otherwise each summary number's
drift in units of its seed standard deviation (the committed sd over seeds; a row of one seed
has none, and its drift is shown but not judged) and any claim whose verdict changed. The
rebuild agrees when no verdict changed, no row appeared or went, no count of seeds, diverged or
failed runs changed, and every judged drift is within the tolerance (2 sd by default). This is
the check for a GPU, or a machine where the bytes cannot match.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .errors import GradlabError

TOLERANCE = 2.0  # seed standard deviations
REFERENCE_FILES = ("manifest.json", "summary.csv", "claims.csv")
# the summary's numbers: each mean with the sd that is its unit, and the counts that must match
MEANS = {"test_accuracy_mean": ("test_accuracy_sd", "test accuracy"),
         "vanishing_ratio_mean": ("vanishing_ratio_sd", "vanishing ratio")}
COUNTS = ("seeds", "diverged", "failed")


class CheckError(GradlabError, ValueError):
    """There is nothing to check against; the message is one line."""


@dataclass(frozen=True)
class Built:
    """An experiment's manifest, summary and claims tables, as built."""

    manifest: dict
    summary: pd.DataFrame
    claims: pd.DataFrame


@dataclass
class Outcome:
    """What ``compare`` found: ``identical`` (the records hash matched), ``ok`` (verdicts and
    tables agree within the tolerance), one line per summary number and claim (``drifts``),
    and the lines that make it disagree (``problems``)."""

    identical: bool
    ok: bool
    headline: str
    drifts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_built(folder: str | os.PathLike) -> Built:
    """The manifest and tables of a built experiment folder (CheckError when missing)."""
    folder = Path(folder)
    missing = [name for name in REFERENCE_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckError(f"{folder} has no {', '.join(missing)} to check against: build it "
                         f"first with gradlab figures SPEC --out {folder}")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        summary = pd.read_csv(folder / "summary.csv", keep_default_na=True)
        claims = (pd.read_csv(folder / "claims.csv")
                  if (folder / "claims.csv").stat().st_size else pd.DataFrame())
    except (ValueError, OSError, pd.errors.ParserError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckError(f"cannot read the committed files of {folder}: {line}") from None
    if not isinstance(manifest, dict) or "records_sha256" not in manifest:
        raise CheckError(f"{folder / 'manifest.json'} is not a gradlab figures manifest")
    return Built(manifest, summary, claims)


def _keys(summary: pd.DataFrame) -> list[str]:
    stats = {*MEANS, *(sd for sd, _ in MEANS.values()), *COUNTS}
    return [c for c in summary.columns if c not in stats]


def _label(row: pd.Series, keys: list[str]) -> str:
    return " ".join(f"{k}={'off' if pd.isna(row[k]) else row[k]}" for k in keys)


def _number(value: float, percent: bool) -> str:
    return "n/a" if pd.isna(value) else (f"{value:.2%}" if percent else f"{value:.3g}")


def summary_drifts(reference: pd.DataFrame, rebuilt: pd.DataFrame,
                   tolerance: float) -> tuple[list[str], list[str]]:
    """Each summary number's drift, as lines, and the lines of those that disagree."""
    keys = _keys(reference)
    if keys != _keys(rebuilt):
        return [], [f"the summary's columns changed: {', '.join(_keys(rebuilt))} instead of "
                    f"{', '.join(keys)}"]
    as_text = {k: str for k in keys}
    both = reference.astype(as_text).merge(rebuilt.astype(as_text), on=keys, how="outer",
                                           suffixes=("_ref", "_new"), indicator=True)
    lines, problems = [], []
    for _, row in both.iterrows():
        label = _label(row, keys)
        if row["_merge"] != "both":
            where = "committed only" if row["_merge"] == "left_only" else "rebuilt only"
            problems.append(f"{label}: a row {where}")
            continue
        for count in COUNTS:
            if count in reference.columns and row[f"{count}_ref"] != row[f"{count}_new"]:
                problems.append(f"{label}: {count} {row[f'{count}_ref']} -> "
                                f"{row[f'{count}_new']}")
        for mean, (sd, words) in MEANS.items():
            if mean not in reference.columns:
                continue
            old, new, unit = row[f"{mean}_ref"], row[f"{mean}_new"], row[f"{sd}_ref"]
            text = (f"{label}: {words} {_number(old, mean.startswith('test'))} -> "
                    f"{_number(new, mean.startswith('test'))}")
            if pd.isna(old) and pd.isna(new):
                continue
            if pd.isna(old) or pd.isna(new):
                problems.append(f"{text} (a value appeared or went)")
            elif old == new:
                lines.append(f"{text} (same)")
            elif pd.isna(unit) or unit == 0:
                lines.append(f"{text} (one seed: no seed sd, not judged)")
            else:
                drift = (new - old) / unit
                lines.append(f"{text} ({drift:+.2f} sd)")
                if abs(drift) > tolerance:
                    problems.append(f"{text}: {drift:+.2f} sd, beyond {tolerance:g} sd")
    return lines, problems


def claim_changes(reference: pd.DataFrame, rebuilt: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Each claim's value beside its committed one, and the claims whose verdict changed (or
    that appeared or went)."""
    if reference.empty and rebuilt.empty:
        return [], []
    old = dict(zip(reference.get("claim", []), reference.itertuples(), strict=True))
    new = dict(zip(rebuilt.get("claim", []), rebuilt.itertuples(), strict=True))
    lines, problems = [], []
    for claim in [*old, *(c for c in new if c not in old)]:
        if claim not in old or claim not in new:
            problems.append(f"claim {claim!r}: {'rebuilt' if claim in new else 'committed'} "
                            f"only")
            continue
        a, b = old[claim], new[claim]
        line = f"claim {claim!r}: {a.gradlab} -> {b.gradlab}"
        if a.verdict != b.verdict:
            problems.append(f"{line}: verdict {_short(a.verdict)!r} -> {_short(b.verdict)!r}")
        else:
            lines.append(f"{line} ({_short(a.verdict)})")
    return lines, problems


def _short(verdict) -> str:
    text = str(verdict)
    return text if len(text) <= 40 else text[:37] + "..."


def compare(reference: Built, rebuilt: Built, tolerance: float = TOLERANCE) -> Outcome:
    """The rebuilt experiment against the committed one."""
    old, new = reference.manifest["records_sha256"], rebuilt.manifest["records_sha256"]
    figures = reference.manifest.get("figures", {})
    same_figures = sum(1 for name, entry in figures.items()
                       if rebuilt.manifest.get("figures", {}).get(name, {}).get("sha256")
                       == entry.get("sha256"))
    if old == new:
        tables = reference.manifest.get("tables", {})
        same_tables = sum(1 for name, digest in tables.items()
                          if rebuilt.manifest.get("tables", {}).get(name) == digest)
        headline = (f"identical: records sha256 {new[:12]}..., {same_figures} of "
                    f"{len(figures)} figures and {same_tables} of {len(tables)} tables "
                    f"byte-identical")
        return Outcome(True, True, headline)
    lines, problems = summary_drifts(reference.summary, rebuilt.summary, tolerance)
    claim_lines, claim_problems = claim_changes(reference.claims, rebuilt.claims)
    problems += claim_problems
    verdicts = ("a claim's verdict changed" if claim_problems
                else f"{len(claim_lines)} claims' verdicts unchanged" if claim_lines
                else "no claims")
    headline = (f"records differ (sha256 {new[:12]}... against the committed {old[:12]}...): "
                f"{verdicts}; {same_figures} of {len(figures)} figures byte-identical; "
                + ("agrees within " if not problems else "disagrees beyond ")
                + f"{tolerance:g} seed sd")
    return Outcome(False, not problems, headline, lines + claim_lines, problems)


def has_runs(folder: str | os.PathLike, run_ids: list[str]) -> bool:
    """Whether ``folder`` holds the records of any of these runs."""
    return any((Path(folder) / "runs" / run_id).is_dir() for run_id in run_ids)


def check(experiment, out: str | os.PathLike, *, tolerance: float = TOLERANCE,
          **build_options) -> Outcome:
    """Rebuild ``experiment`` (reading the records that ``out`` holds, training the missing
    ones there; with none there, training them all in a scratch folder) into a scratch folder
    and compare it with the committed manifest and tables of ``out``, which are left as they
    are. ``build_options``: as for ``gradlab.experiment.build``."""
    from .experiment import build

    if not tolerance > 0 or math.isinf(tolerance):
        raise CheckError(f"tolerance {tolerance!r} is invalid: a positive number of seed sd")
    reference = read_built(out)
    ids = [c.run_id() for c in experiment.configs()]
    with tempfile.TemporaryDirectory(prefix="gradlab-check-") as scratch:
        built = Path(scratch) / "built"
        if has_runs(out, ids):  # its records are read (and its missing runs trained) there
            built.mkdir()
            (built / "runs").symlink_to(Path(out, "runs").resolve(), target_is_directory=True)
        build(experiment, built, **build_options)
        rebuilt = read_built(built)
    return compare(reference, rebuilt, tolerance)
