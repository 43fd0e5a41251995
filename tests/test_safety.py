"""gradlab never unpickles or evaluates data it reads: JSON, TOML and Parquet only."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

import gradlab
from gradlab.cli import cli
from gradlab.validate import digests

SOURCE = Path(__file__).resolve().parents[1] / "gradlab"
FORBIDDEN = [r"\bpickle\b", r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"\bmarshal\b",
             r"\byaml\.load\(", r"read_pickle", r"allow_pickle\s*=\s*True", r"\bshelve\b",
             r"\bdill\b", r"\bcloudpickle\b", r"\bjsonpickle\b", r"__import__\(",
             r"\bnp\.load\(", r"\bnumpy\.load\(", r"literal_eval"]


def test_no_unpickling_or_eval_in_gradlab():
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        for pattern in FORBIDDEN:
            assert not re.search(pattern, text), f"{path.name}: {pattern}"
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"


class Payload:
    """Unpickling this creates the file ``marker`` (what an attacker's code would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_inside_a_parquet_file_is_never_run(one_run, tmp_path):
    """A Parquet column whose Arrow extension type carries a pickle (CVE-2023-47248: pyarrow
    before 14.0.1 unpickled it on read) is read as plain bytes by load, ls, plot and report."""
    out = tmp_path / "res"
    shutil.copytree(one_run, out)
    marker = tmp_path / "unpickled"
    field = pa.field("note", pa.binary(), metadata={
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": pickle.dumps(Payload(marker))})
    for path in out.glob("runs/*/*.parquet"):
        table = pq.read_table(path)
        note = pa.array([b"x"] * table.num_rows, pa.binary())
        pq.write_table(table.append_column(field, note), path)
    for status in out.glob("runs/*/status.json"):  # digests made anew, as an attacker would
        meta = json.loads(status.read_text())
        meta["sha256"] = digests(status.parent)
        status.write_text(json.dumps(meta))
    assert gradlab.load(out).grads["note"].iloc[0] == b"x"
    for command in (["ls"], ["plot", "--only", "vanishing_ratio"], ["report"]):
        r = CliRunner().invoke(cli, [command[0], str(out), *command[1:]])
        assert r.exit_code == 0, r.output
    assert not marker.exists()
