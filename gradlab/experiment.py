"""Experiment specs: TOML files of sweeps plus the figures and tables drawn from them.

A spec (see ``experiments/*.toml``)::

    description = "what it shows"
    [[sweep]]                      # one or more; each key is a run option, a list sweeps it
    depth = [3, 5, 10]
    activation = ["sigmoid", "relu"]
    seed = [0, 1, 2]
    [figures]                      # optional
    only = ["grad_norm_by_layer"]  # default: every figure of gradlab.plots; paper figures
                                   # (gradlab.paper_figures.PAPER_FIGURES) only when named
    formats = ["png"]              # png, pdf, svg
    [[claim]]                      # optional, any number: see gradlab.claims

``build(spec)`` runs what is missing (resumably, as a sweep), then writes to ``results/NAME/``:
``figures/``, ``summary.csv``, ``summary.md`` (opening with the claims table), ``claims.csv``
and ``manifest.json``: the run_ids, a content hash of the records behind each figure, the
tables' hashes, versions, git SHA, whether the runs trained in the portable CPU mode
(``gradlab.portable``), and under ``machine`` what it was built on (CPU, flags, code paths,
threads). Two builds compare equal on every key but ``machine``, ``git_sha`` and ``versions``
when they made the same bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .claims import ClaimError, check_claim, claims_markdown, evaluate_claims
from .config import CONFIG_FIELDS, ConfigError, RunConfig, expand_grid, load_toml
from .errors import GradlabError
from .summary import options_off, summary_table

SPEC_KEYS = ("description", "sweep", "figures", "claim")
FIGURE_KEYS = ("only", "formats")
FORMATS = ("png", "pdf", "svg")


class SpecError(GradlabError, ValueError):
    """An experiment spec is invalid; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class Experiment:
    """A parsed spec. ``name`` is the file's stem; results go to ``results/<name>/``."""

    name: str
    path: Path
    description: str
    sweeps: tuple[dict[str, Any], ...]
    only: tuple[str, ...] | None
    formats: tuple[str, ...]
    claims: tuple[dict[str, Any], ...] = ()

    def configs(self) -> list[RunConfig]:
        """Every run of every sweep, in spec order, without duplicates."""
        seen: dict[str, RunConfig] = {}
        for index, grid in enumerate(self.sweeps, 1):
            try:
                runs = expand_grid(grid)
            except ConfigError as e:
                raise SpecError(f"{self.path}: [[sweep]] {index}: {e}") from None
            for config in runs:
                seen.setdefault(config.run_id(), config)
        return list(seen.values())


def _string_list(path: Path, key: str, value: Any, allowed: tuple[str, ...] | None) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise SpecError(f"{path}: figures.{key} = {value!r} is invalid: a non-empty list of "
                        f"strings")
    if allowed is not None:
        bad = [v for v in value if v not in allowed]
        if bad:
            raise SpecError(f"{path}: figures.{key} has {bad[0]!r}: allowed are "
                            f"{', '.join(allowed)}")
    return tuple(value)


def load_spec(path: str | os.PathLike) -> Experiment:
    """Read and validate a spec; every problem is a one-line SpecError before anything runs."""
    from .paper_figures import PAPER_FIGURES
    from .plots import FIGURES

    path = Path(path)
    if path.suffix != ".toml":
        raise SpecError(f"{path}: an experiment spec is a .toml file")
    try:
        raw = load_toml(str(path))
    except ConfigError as e:
        raise SpecError(str(e)) from None
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r}: allowed are "
                        f"{', '.join(SPEC_KEYS)}")
    sweeps = raw.get("sweep")
    if not isinstance(sweeps, list) or not sweeps or not all(isinstance(s, dict)
                                                             for s in sweeps):
        raise SpecError(f"{path}: needs at least one [[sweep]] table of run options")
    for index, grid in enumerate(sweeps, 1):
        if not grid:  # would train the defaults: 10 epochs of full MNIST, surely not meant
            raise SpecError(f"{path}: [[sweep]] {index} is empty: give run options such as "
                            f"depth = [3, 5] and activation = [\"sigmoid\", \"relu\"]")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise SpecError(f"{path}: description must be a string")
    figures = raw.get("figures", {})
    if not isinstance(figures, dict):
        raise SpecError(f"{path}: [figures] must be a table with keys {', '.join(FIGURE_KEYS)}")
    bad = sorted(set(figures) - set(FIGURE_KEYS))
    if bad:
        raise SpecError(f"{path}: unknown key figures.{bad[0]}: allowed are "
                        f"{', '.join(FIGURE_KEYS)}")
    only = (_string_list(path, "only", figures["only"], (*FIGURES, *PAPER_FIGURES))
            if "only" in figures else None)
    formats = _string_list(path, "formats", figures.get("formats", ["png"]), FORMATS)
    claims = raw.get("claim", [])
    if not isinstance(claims, list):
        raise SpecError(f"{path}: claim must be [[claim]] tables")
    for index, claim in enumerate(claims, 1):
        try:
            check_claim(claim, (*CONFIG_FIELDS, "width"))
        except ClaimError as e:
            raise SpecError(f"{path}: [[claim]] {index}: {e}") from None
    experiment = Experiment(path.stem, path, description, tuple(sweeps), only, formats,
                            tuple(claims))
    experiment.configs()  # validate every run now
    return experiment


def records_digest(frames: list[pd.DataFrame]) -> str:
    """A content hash of records: sorted rows, timing columns left out (they vary by machine)."""
    h = hashlib.sha256()
    for frame in frames:
        frame = frame.drop(columns=[c for c in ("seconds",) if c in frame.columns])
        keys = [c for c in ("run_id", "step", "epoch", "split", "layer") if c in frame.columns]
        frame = frame.sort_values(keys).reset_index(drop=True)
        h.update(",".join(frame.columns).encode())
        h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(
    experiment: Experiment,
    out: str | os.PathLike | None = None,
    *,
    jobs: int = 1,
    threads: int = 1,
    data_dir: str | None = None,
    device: str = "cpu",
    portable: bool = False,
    on_start=None,
    on_run=None,
    on_progress=None,
) -> dict:
    """Run what is missing of an experiment, then write its figures, summary and manifest.

    Args:
        experiment: from ``load_spec``.
        out: the results folder; default ``results/<name>``.
        jobs, threads, data_dir, device, portable, on_start, on_run, on_progress: as for
            ``gradlab.sweep.run_sweep``. The default device is the CPU, whose runs are bit-for-bit
            reproducible on one machine, and on every x86-64 CPU with AVX2 when ``portable``.

    Returns the manifest (also written to ``out/manifest.json``).
    """
    from . import __version__
    from .paper_figures import PAPER_FIGURES, write_paper_figures
    from .plots import FIGURES, write_figures
    from .store import atomic_write, git_sha, load, write_json
    from .sweep import run_sweep

    out = Path(out) if out is not None else Path("results") / experiment.name
    configs = experiment.configs()
    sweep = run_sweep(configs, out, jobs=jobs, threads=threads, data_dir=data_dir,
                      device=device, portable=portable, on_start=on_start, on_run=on_run,
                      on_progress=on_progress)
    ids = [c.run_id() for c in configs]
    # only this experiment's runs are drawn, even if the folder has more
    results = load(out, run_ids=ids)
    table = summary_table(results)
    claims = evaluate_claims(list(experiment.claims), results)
    atomic_write(out / "summary.csv",
            lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g",
                                     lineterminator="\n"))
    atomic_write(out / "claims.csv",
            lambda tmp: claims.to_csv(tmp, index=False, float_format="%.6g",
                                      lineterminator="\n"))
    atomic_write(out / "summary.md", lambda tmp: tmp.write_text(markdown_summary(
        experiment, table, claims, results)))
    standard = [n for n in experiment.only or FIGURES if n in FIGURES]
    figures = write_figures(out, experiment.formats, standard) if standard else []
    papers = [n for n in experiment.only or () if n in PAPER_FIGURES]
    figures += write_paper_figures(results, out, papers, experiment.formats)
    digest = records_digest([results.grads, results.epochs]
                            + ([results.dists] if not results.dists.empty else []))
    manifest = {
        "experiment": experiment.name,
        "spec": experiment.path.name,
        "spec_sha256": file_digest(experiment.path),
        "description": experiment.description,
        "runs": sorted(ids),
        "statuses": {c.run_id(): sweep.status(c.run_id()) for c in configs},
        "records_sha256": digest,
        "figures": {p.relative_to(out).as_posix(): {"sha256": file_digest(p),
                                                    "records_sha256": digest,
                                                    "runs": sorted(ids)}
                    for p in sorted(figures)},
        "tables": {name: file_digest(out / name)
                   for name in ("summary.csv", "summary.md", "claims.csv")},
        "versions": _versions(__version__),
        "git_sha": git_sha(),
        "device": device,
        "portable": portable,
        "machine": _machine(portable, threads),
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def step0_table(results) -> str:
    """The vanishing ratio at step 0 (initialisation) beside its median over training, per
    setup, mean ± sd over the complete runs' seeds ("" when there are no records)."""
    from .tables import complete_only, table_keys, vanishing_ratios

    grads = results.grads
    if grads.empty or (grads["depth"] < 2).all():
        return ""
    grads = complete_only(grads, results.runs)
    if grads.empty:
        return ""
    both = vanishing_ratios(grads[grads["step"] == 0]).merge(
        vanishing_ratios(grads)[["run_id", "vanishing_ratio"]], on="run_id",
        suffixes=("_step0", "_median"))
    keys = table_keys(both)
    rows = []
    for key, group in both.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        for column, label in (("vanishing_ratio_step0", "step 0"),
                              ("vanishing_ratio_median", "median over training")):
            values = group[column].dropna()
            sd = f" ± {values.std():.2g}" if len(values) > 1 else ""
            row[label] = f"{values.mean():.3g}{sd}" if len(values) else "n/a"
        rows.append(row)
    return options_off(pd.DataFrame(rows)).to_string(index=False)


def markdown_summary(experiment: Experiment, table: pd.DataFrame, claims: pd.DataFrame,
                     results) -> str:
    """The Markdown page: the claims table first, then the summary table (a fenced block
    keeps the aligned columns) and the step-0 vanishing ratios."""
    from .sweep import format_summary

    parts = [f"# {experiment.name}\n\n{experiment.description}\n"]
    if len(claims):
        parts.append("## Claims, checked\n\nEach value is computed from the stored records "
                     "(mean ± sd over the matching complete runs, n of them); the claims, "
                     f"measures and run filters are declared in `{experiment.path.name}`.\n\n"
                     + claims_markdown(claims))
    parts.append("## Summary\n\nFinal test accuracy and vanishing ratio (median over recorded "
                 "steps of ‖∂L/∂W_first‖ / ‖∂L/∂W_last‖), mean ± sd over seeds of complete runs: "
                 "diverged runs are counted in `diverged`, and their partial records are left "
                 "out of both statistics. Unset options read \"off\".\n\n"
                 f"```\n{format_summary(table)}\n```\n")
    step0 = step0_table(results)
    if step0:
        parts.append("## Vanishing ratio at initialisation and over training\n\n"
                     "‖∂L/∂W_first‖ / ‖∂L/∂W_last‖ at step 0 (the initialised net, before any "
                     "update) beside its median over the recorded steps, mean ± sd over "
                     f"seeds.\n\n```\n{step0}\n```\n")
    return "\n".join(parts)


def summary_text(out: str | os.PathLike) -> str:
    """The summary table of a built experiment as text, read back from its summary.md (the
    first fenced block that ``markdown_summary`` writes)."""
    return (Path(out) / "summary.md").read_text().split("```")[1].strip("\n")


def _versions(gradlab_version: str) -> dict[str, str]:
    import platform

    import matplotlib
    import seaborn
    import torch

    versions = {"gradlab": gradlab_version, "torch": torch.__version__,
                "pandas": pd.__version__, "matplotlib": matplotlib.__version__,
                "seaborn": seaborn.__version__, "python": platform.python_version()}
    try:
        import numba
    except ImportError:  # optional (gradlab[fast])
        return versions
    return {**versions, "numba": numba.__version__}


def _machine(portable: bool, threads: int) -> dict:
    """The manifest's ``machine``: what this build ran on (``gradlab.portable.machine``) and
    whether this process itself computed in the portable mode (its runs may have trained in
    fresh workers that did)."""
    from . import portable as mode

    return {**mode.machine(portable, threads), "portable_in_this_process": mode.in_effect()}
