"""gradlab never unpickles or evaluates data it reads: JSON, TOML and Parquet only."""

import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "gradlab"
FORBIDDEN = [r"\bpickle\b", r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"\bmarshal\b",
             r"\byaml\.load\(", r"read_pickle", r"allow_pickle\s*=\s*True", r"\bshelve\b"]


def test_no_unpickling_or_eval_in_gradlab():
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        for pattern in FORBIDDEN:
            assert not re.search(pattern, text), f"{path.name}: {pattern}"
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
