"""Everything read back from a run folder, validated: status.json, config.json and the Parquet
records. A file that is missing, unreadable or of the wrong shape raises ``Damaged`` with one
line naming the file and what is wrong, so every reader (load, ls, plot, report, the sweep)
can name it and go on; none of them sees a traceback.

A run is identified by the ``run_id`` inside its files, which must equal its folder's name: a
copied folder (``cp -a runs/A runs/B``) is a named skip, never counted twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import ConfigError, make_config

STATUSES = ("complete", "diverged", "failed")
RECORDS = ("grads.parquet", "epochs.parquet")
OPTIONAL_RECORDS = ("dists.parquet", "time.parquet", "metrics.parquet")
# The files whose digests status.json holds (those there when the run finished).
DIGESTED = ("config.json", *RECORDS, *OPTIONAL_RECORDS)

# Columns each record file must have, and the kind of each column gradlab knows (any other
# column is accepted as it is). Columns new this session (layer_name, applied_update_ratio) are
# known but not required: older files lack them.
REQUIRED = {
    "grads.parquet": ("run_id", "step", "layer", "grad_weight_norm"),
    "epochs.parquet": ("run_id", "epoch", "split", "loss", "accuracy"),
    "dists.parquet": ("run_id", "step", "layer", "quantity", "stat", "value"),
    "time.parquet": ("run_id", "step", "layer", "t", "grad_input_norm", "grad_output_norm"),
    "metrics.parquet": ("run_id", "step", "split", "metric", "value"),
}
TEXT_COLUMNS = ("run_id", "split", "layer_name", "quantity", "stat", "metric")
NUMERIC_COLUMNS = ("step", "epoch", "layer", "grad_output_norm", "grad_weight_norm",
                   "grad_bias_norm", "weight_norm", "update_ratio", "applied_update_ratio",
                   "act_grad_mean", "saturated_frac", "dead_frac", "loss", "accuracy", "seconds",
                   "q", "bin_lo", "bin_hi", "value", "t", "grad_input_norm")

# status.json fields besides ``status``: (kinds allowed, description for the error)
NUMBER, INTEGER, TEXT = "a number", "an integer", "a string"
STATUS_FIELDS = {"run_id": TEXT, "steps": INTEGER, "seconds": NUMBER,
                 "final_test_accuracy": NUMBER, "diverged_step": INTEGER, "error": TEXT,
                 "finished": TEXT}


class Damaged(ValueError):
    """A run file does not read back as what it should be; the message is one line that starts
    with the file's name."""


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) turned into None, so that it can be written
    as strict JSON (``null``); files written before this was done may hold ``NaN``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def read_json(path: Path) -> Any:
    """A JSON file's value (NaN written by older versions read as None), or Damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Damaged(f"{path.name} missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise Damaged(f"{path.name} unreadable ({reason(e)})") from None
    try:
        return strict(json.loads(text))
    except ValueError as e:
        raise Damaged(f"{path.name} unreadable (not JSON: {e})") from None


def reason(error: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    text = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def describe(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def is_kind(value: Any, kind: str) -> bool:
    if value is None:
        return True
    if kind == TEXT:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return kind == NUMBER or float(value).is_integer()


def read_status(run: Path) -> dict | None:
    """The run's status.json, validated; None when there is none (an unfinished run)."""
    try:
        (run / "status.json").stat()
    except FileNotFoundError:
        return None
    except OSError as e:  # e.g. a name too long
        raise Damaged(f"status.json unreadable ({e.strerror or type(e).__name__})") from None
    status = read_json(run / "status.json")
    if not isinstance(status, dict):
        raise Damaged(f"status.json invalid: {describe(status)} is not an object")
    if status.get("status") not in STATUSES:
        raise Damaged(f"status.json invalid: status is {describe(status.get('status'))}, "
                      f"expected one of {', '.join(STATUSES)}")
    for key, kind in STATUS_FIELDS.items():
        if not is_kind(status.get(key), kind):
            raise Damaged(f"status.json invalid: {key} is {describe(status[key])}, expected "
                          f"{kind} or null")
    check_run_id(run, "status.json", status.get("run_id", run.name))
    sums = status.get("sha256", {})
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise Damaged(f"status.json invalid: sha256 is {describe(sums)}, expected an object of "
                      f"file name: hex digest")
    return status


def digests(run: Path) -> dict[str, str]:
    """The sha256 of each file of DIGESTED that the run folder holds."""
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
            for name in DIGESTED if (run / name).is_file()}


def check_run_id(run: Path, name: str, run_id: Any) -> None:
    if run_id != run.name:
        raise Damaged(f"{name} belongs to run {describe(run_id)}, not to its folder "
                      f"{run.name} (a copied folder?)")


def read_config(run: Path) -> dict:
    """The run's config.json, validated: an object whose ``run_id`` is its folder's name, whose
    ``config`` is an object (a valid RunConfig for runs of gradlab train/sweep) and whose
    ``provenance`` is an object."""
    meta = read_json(run / "config.json")
    if not isinstance(meta, dict):
        raise Damaged(f"config.json invalid: {describe(meta)} is not an object")
    check_run_id(run, "config.json", meta.get("run_id"))
    for key in ("config", "provenance"):
        if not isinstance(meta.get(key, {}), dict):
            raise Damaged(f"config.json invalid: {key} is {describe(meta[key])}, expected an "
                          f"object")
    if not isinstance(meta.get("config"), dict):
        raise Damaged("config.json invalid: no config object")
    if is_gradlab_run(meta):
        try:
            meta = {**meta, "config": make_config(**meta["config"]).to_dict()}
        except (ConfigError, TypeError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise Damaged(f"config.json invalid: {first}") from None
    return meta


def is_gradlab_run(meta: dict) -> bool:
    """Whether a run was trained by gradlab train/sweep (its config is a RunConfig), not saved
    from a user's own loop by ``gradlab.watch``."""
    return meta.get("source", "gradlab") == "gradlab"


def check_schema(name: str, schema: pa.Schema) -> None:
    missing = [c for c in REQUIRED.get(name, ("run_id",)) if c not in schema.names]
    if missing:
        raise Damaged(f"{name} invalid: no column {', '.join(missing)}")
    for field in schema:
        if field.name in TEXT_COLUMNS:
            ok = pa.types.is_string(field.type) or pa.types.is_large_string(field.type) \
                or pa.types.is_dictionary(field.type)
            want = "text"
        elif field.name in NUMERIC_COLUMNS:
            ok = pa.types.is_integer(field.type) or pa.types.is_floating(field.type) \
                or pa.types.is_null(field.type)
            want = "numbers"
        else:
            continue
        if not ok:
            raise Damaged(f"{name} invalid: column {field.name} holds {field.type}, "
                          f"expected {want}")


def read_records(run: Path, name: str) -> pd.DataFrame:
    """A record file of the run as a frame, validated: readable in full, the columns its kind
    requires with numeric or text types, and the run's own ``run_id`` in every row."""
    path = run / name
    if not path.exists():
        raise Damaged(f"{name} missing")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise Damaged(f"{name} unreadable ({reason(e)})") from None
    check_schema(name, table.schema)
    ids = set(table.column("run_id").unique().to_pylist())
    if ids - {run.name}:
        raise Damaged(f"{name} belongs to run {describe(sorted(ids - {run.name})[0])}, not to "
                      f"its folder {run.name} (a copied folder?)")
    return table.to_pandas()


def promised(meta: dict, status: dict) -> list[tuple[str, bool]]:
    """The record files a finished run's status promises, each with whether it must hold rows."""
    if status["status"] == "failed" or not is_gradlab_run(meta):
        return []  # a failed run may have failed before it recorded anything
    config = meta["config"]
    recorded = config.get("log_every", 1) != 0 and (status.get("steps") or 0) > 0
    complete = status["status"] == "complete"
    return [("grads.parquet", recorded and complete), ("epochs.parquet", complete)]


def check_run(run: Path) -> tuple[dict | None, list[str]]:
    """Whether a run folder holds a finished run whose files all read back.

    Returns (status, problems): status is None for an unfinished run (no status.json);
    problems is one line per damaged file, empty when every file the status promises reads
    back whole (config.json; grads and epochs of a complete or diverged run, with rows where a
    complete run must have them; dists.parquet, time.parquet and metrics.parquet if there).
    """
    problems = []
    try:
        status = read_status(run)
    except Damaged as e:
        return None, [str(e)]
    if status is None:
        return None, []
    try:
        meta = read_config(run)
    except Damaged as e:
        return status, [str(e)]
    files = promised(meta, status)
    files += [(name, False) for name in OPTIONAL_RECORDS if (run / name).exists()]
    for name, needs_rows in files:
        try:
            frame = read_records(run, name)
        except Damaged as e:
            problems.append(str(e))
            continue
        if needs_rows and frame.empty:
            problems.append(f"{name} invalid: no rows, but the run is {status['status']}")
    if not problems:  # every file reads: has any byte changed since the run finished?
        problems = changed(run, status.get("sha256", {}))
    return status, problems


def changed(run: Path, sums: dict[str, str]) -> list[str]:
    """One line per file whose sha256 is not the one status.json holds (runs written before
    status.json held digests have none to compare)."""
    problems = []
    for name, digest in sums.items():
        try:
            now = hashlib.sha256((run / name).read_bytes()).hexdigest()
        except OSError as e:
            problems.append(f"{name} unreadable ({reason(e)})")
            continue
        if now != digest:
            problems.append(f"{name} changed since the run finished (its sha256 is not the "
                            f"one in status.json)")
    return problems
