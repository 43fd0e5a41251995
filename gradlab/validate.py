"""Everything read back from a run folder, validated: status.json, config.json and the Parquet
records. A file that is missing, unreadable or of the wrong shape raises ``Damaged`` with one
line naming the file and what is wrong, so every reader (load, ls, plot, report, the sweep)
can name it and go on; none of them sees a traceback.

A run is identified by the ``run_id`` inside its files, which must equal its folder's name: a
copied folder (``cp -a runs/A runs/B``) is a named skip, never counted twice.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import numbers
import os
import re
import stat
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

# The largest JSON file read: gradlab's own are a few KB (an error note is cut when written), so
# a larger one is damage, never a reason to read until memory runs out.
JSON_LIMIT = 4 * 2**20
# A digest's key: a plain file name of the run folder (never a path, never a hidden file).
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# status.json fields besides ``status``: (kinds allowed, description for the error)
NUMBER, INTEGER, TEXT = "a number", "an integer", "a string"
STATUS_FIELDS = {"run_id": TEXT, "steps": INTEGER, "seconds": NUMBER,
                 "final_test_accuracy": NUMBER, "diverged_step": INTEGER, "error": TEXT,
                 "finished": TEXT, "vanishing_ratio": NUMBER}
# Ranges of status.json's numbers, checked when read: (low, high), either None for no bound.
STATUS_RANGES = {"final_test_accuracy": (0, 1), "steps": (0, None), "seconds": (0, None),
                 "diverged_step": (0, None), "vanishing_ratio": (0, None)}


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


def read_bytes(path: Path, limit: int | None = None) -> bytes:
    """The bytes of a regular file, or Damaged: a link is not followed (it could lead out of
    the run folder), a FIFO or device is never read (it could block or never end), and a file
    over ``limit`` bytes is not read."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise Damaged(f"{path.name} missing") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Damaged(f"{path.name} is a link, not a file of the run") from None
        raise Damaged(f"{path.name} unreadable ({reason(e)})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Damaged(f"{path.name} is not a regular file")
        if limit is not None and info.st_size > limit:
            raise Damaged(f"{path.name} too large ({info.st_size} bytes, at most {limit})")
        with os.fdopen(os.dup(fd), "rb") as file:
            data = file.read() if limit is None else file.read(limit + 1)
    except OSError as e:
        raise Damaged(f"{path.name} unreadable ({reason(e)})") from None
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:  # (it grew while read)
        raise Damaged(f"{path.name} too large (over {limit} bytes)")
    return data


def read_json(path: Path) -> Any:
    """A JSON file's value (NaN written by older versions read as None), or Damaged: any
    error of its reading or parsing (nesting too deep included) is a one-line Damaged."""
    return parse_json(path.name, read_bytes(path, JSON_LIMIT))


def parse_json(name: str, data: bytes) -> Any:
    """The value of the JSON file ``name`` of bytes ``data``, or Damaged."""
    constants = []  # NaN / Infinity (written by older versions): only then is strict() run

    def constant(text: str) -> float:
        constants.append(text)
        return float(text)

    try:
        value = json.loads(data.decode("utf-8"), parse_constant=constant)
        # strict() walks every value: 0.9 of 4.7 ms a run of `gradlab ls` at 1,000 runs
        return strict(value) if constants else value
    except UnicodeDecodeError as e:
        raise Damaged(f"{name} unreadable ({reason(e)})") from None
    except ValueError as e:
        raise Damaged(f"{name} unreadable (not JSON: {reason(e)})") from None
    except RecursionError:
        raise Damaged(f"{name} unreadable (JSON nested too deep)") from None


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
        (run / "status.json").lstat()
    except FileNotFoundError:
        return None
    except OSError as e:  # e.g. a name too long
        raise Damaged(f"status.json unreadable ({e.strerror or type(e).__name__})") from None
    return check_status(run, read_json(run / "status.json"))


def check_status(run: Path, status: Any) -> dict:
    """status.json's value, validated: a known status, fields of their kinds and ranges, the
    run's own run_id, and digests whose keys are plain file names."""
    if not isinstance(status, dict):
        raise Damaged(f"status.json invalid: {describe(status)} is not an object")
    if status.get("status") not in STATUSES:
        raise Damaged(f"status.json invalid: status is {describe(status.get('status'))}, "
                      f"expected one of {', '.join(STATUSES)}")
    for key, kind in STATUS_FIELDS.items():
        if not is_kind(status.get(key), kind):
            raise Damaged(f"status.json invalid: {key} is {describe(status[key])}, expected "
                          f"{kind} or null")
    for key, (low, high) in STATUS_RANGES.items():
        value = status.get(key)
        if value is not None and not (value >= low and (high is None or value <= high)):
            allowed = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise Damaged(f"status.json invalid: {key} is {describe(value)}, expected a "
                          f"number {allowed}, or null")
    check_run_id(run, "status.json", status.get("run_id", run.name))
    sums = status.get("sha256", {})
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise Damaged(f"status.json invalid: sha256 is {describe(sums)}, expected an object of "
                      f"file name: hex digest")
    bad = [name for name in sums if not FILE_NAME.fullmatch(name)]
    if bad:  # a key is opened as a file of the run: never a path out of it
        raise Damaged(f"status.json invalid: sha256 names {describe(bad[0])}, expected plain "
                      f"file names of the run folder")
    return status


def digests(run: Path) -> dict[str, str]:
    """The sha256 of each file of DIGESTED that the run folder holds."""
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
            for name in DIGESTED if (run / name).is_file() and not (run / name).is_symlink()}


def check_run_id(run: Path, name: str, run_id: Any) -> None:
    if run_id != run.name:
        raise Damaged(f"{name} belongs to run {describe(run_id)}, not to its folder "
                      f"{run.name} (a copied folder?)")


def read_config(run: Path) -> dict:
    """The run's config.json, validated: an object whose ``run_id`` is its folder's name, whose
    ``config`` is an object (a valid RunConfig for runs of gradlab train/sweep) and whose
    ``provenance`` is an object."""
    return read_config_bytes(run)[0]


def read_config_bytes(run: Path) -> tuple[dict, bytes]:
    """``read_config``, and the file's bytes (to check its digest without reading it again)."""
    data = read_bytes(run / "config.json", JSON_LIMIT)
    return check_config(run, parse_json("config.json", data)), data


def check_config(run: Path, meta: Any) -> dict:
    """config.json's value, validated (``read_config``)."""
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


def check_schema(name: str, schema: pa.Schema, columns: list[str] | None = None) -> None:
    """The columns a record file of kind ``name`` requires (of ``columns`` only, when given:
    a selection) are there, with numeric or text types; else Damaged."""
    required = REQUIRED.get(name, ("run_id",))
    if columns is not None:
        required = [c for c in required if c in columns]
    missing = [c for c in required if c not in schema.names]
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
    table = parse_records(name, read_bytes(run / name))
    check_schema(name, table.schema)
    check_table_run(run, name, table)
    try:  # (a damaged footer's pandas metadata fails only here, e.g. as invalid UTF-8)
        return table.to_pandas()
    except (ValueError, pa.ArrowException) as e:
        raise Damaged(f"{name} unreadable ({reason(e)})") from None


def check_table_run(run: Path, name: str, table: pa.Table) -> None:
    """Every row of a record table holds the run's own ``run_id``; else Damaged."""
    ids = set(table.column("run_id").unique().to_pylist())
    if ids - {run.name}:
        raise Damaged(f"{name} belongs to run {describe(sorted(ids - {run.name})[0])}, not to "
                      f"its folder {run.name} (a copied folder?)")


def parse_records(name: str, data: bytes, columns: list[str] | None = None,
                  filters=None) -> pa.Table:
    """A record file's bytes as a table, or Damaged: the ``columns`` of it that it has (all
    when None), the rows that ``filters`` keep (as for ``pyarrow.parquet.read_table``)."""
    try:
        if filters is None:  # the footer parsed once, not twice (read_table parses it again)
            file = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
            if columns is not None:  # (a file of an older version may lack a newer column)
                names = file.schema_arrow.names
                columns = [c for c in columns if c in names]
            return file.read(columns=columns, use_threads=False)
        if columns is not None:
            names = pq.ParquetFile(pa.BufferReader(data)).schema_arrow.names
            columns = [c for c in columns if c in names]
        return pq.read_table(pa.BufferReader(data), columns=columns, filters=filters,
                             page_checksum_verification=True)
    except (OSError, pa.ArrowException, ValueError) as e:
        raise Damaged(f"{name} unreadable ({reason(e)})") from None


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
    problems is one line per damaged file, empty when the run is whole (``check_files``).
    """
    try:
        status = read_status(run)
    except Damaged as e:
        return None, [str(e)]
    if status is None:
        return None, []
    try:
        meta, data = read_config_bytes(run)
    except Damaged as e:
        return status, [str(e)]
    return status, check_files(run, meta, status, {"config.json": data})


def check_files(run: Path, meta: dict, status: dict,
                read: dict[str, bytes] | None = None) -> list[str]:
    """One line per damaged file of a finished run, none when it is whole.

    A run's status.json holds the sha256 of every file it has (``close_run``): the files it
    promises (config.json; grads and epochs of a complete or diverged run) and the optional
    records there must each have one, and each file named must be a regular file of the run
    whose bytes still have it; that is, they are the bytes the writer wrote, with the schema
    and rows it checked. Runs written before status.json held digests have their records
    read in full instead. ``read``: bytes already read (config.json), not read again.
    """
    files = promised(meta, status)
    files += [(name, False) for name in OPTIONAL_RECORDS if os.path.lexists(run / name)]
    sums = status.get("sha256") or {}
    if not sums:
        return read_in_full(run, status, files)
    undigested = [name for name in ("config.json", *(name for name, _ in files))
                  if name not in sums]
    problems = [f"{name} missing" if not os.path.lexists(run / name) else
                why_changed(run, name, "has no digest in status.json") for name in undigested]
    return problems or changed(run, sums, read or {})


def read_in_full(run: Path, status: dict, files: list[tuple[str, bool]]) -> list[str]:
    """One line per record file of ``files`` that does not read back in full (or has no rows
    where it must have some)."""
    problems = []
    for name, needs_rows in files:
        try:
            frame = read_records(run, name)
        except Damaged as e:
            problems.append(str(e))
            continue
        if needs_rows and frame.empty:
            problems.append(f"{name} invalid: no rows, but the run is {status['status']}")
    return problems


def changed(run: Path, sums: dict[str, str], read: dict[str, bytes] | None = None) -> list[str]:
    """One line per file whose sha256 is not the one status.json holds (or that is not a
    regular file of the run); ``read``: bytes already read, by file name."""
    problems = []
    for name, digest in sums.items():
        try:
            data = (read or {}).get(name)
            now = hashlib.sha256(read_bytes(run / name) if data is None else data).hexdigest()
        except Damaged as e:
            problems.append(str(e))
            continue
        if now != digest:
            problems.append(why_changed(run, name))
    return problems


def why_changed(run: Path, name: str, what: str = "changed since the run finished (its "
                "sha256 is not the one in status.json)") -> str:
    """One line for a file whose digest is not status.json's (``what``): what is wrong with
    it where a record file does not read back (rare: only a damaged run pays for this read)."""
    if name in REQUIRED:
        try:
            read_records(run, name)
        except Damaged as e:
            return f"{e} ({what.split(' (')[0]})"
    return f"{name} {what}"
