"""Bad input, one table: every case exits non-zero with ONE line that names the problem and what
is allowed, shows no traceback, and writes nothing (the folder the case runs in is unchanged).

Cases run through click's CliRunner; a few run again in a real ``python -m gradlab`` process to
show that nothing but that line reaches stderr.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from click.testing import CliRunner

from gradlab.cli import cli

from .conftest import write_fake_mnist, write_idx


class Case(NamedTuple):
    id: str
    argv: tuple[str, ...]  # placeholders: {data} {out} {file} {plain} {res} {empty} {spec} ...
    needles: tuple[str, ...]  # the problem and what is allowed, all in the one line
    spec: str | bytes | None = None  # written to {spec} (a .toml file) first

    def args(self, places: dict[str, str]) -> list[str]:
        return [a.format_map(places) for a in self.argv]


TRAIN = ("train", "--epochs", "1", "--data-dir", "{data}", "--out", "{out}")
SWEEP = ("sweep", "--preset", "train", "--epochs", "1", "--jobs", "1", "--data-dir", "{data}",
         "--out", "{out}")
FIG = ("figures", "{spec}", "--data-dir", "{data}", "--out", "{out}")
RUN_KEYS = "allowed: dataset, depth, widths"

CASES = [
    # -- gradlab train: run options --------------------------------------------------------
    Case("train-depth-zero", (*TRAIN, "--depth", "0"), ("'--depth'", "1<=x<=64")),
    Case("train-depth-above-limit", (*TRAIN, "--depth", "65"), ("'--depth'", "1<=x<=64")),
    Case("train-width-zero", (*TRAIN, "--width", "0"), ("'--width'", "1<=x<=8192")),
    Case("train-widths-not-matching-depth", (*TRAIN, "--depth", "3", "--widths", "8,8,8"),
         ("widths='8,8,8'", "depth 3 needs 2 hidden widths")),
    Case("train-widths-empty-item", (*TRAIN, "--widths", "8,,8"),
         ("'--widths'", "empty item", "separated by ','")),
    Case("train-width-and-widths", (*TRAIN, "--width", "8", "--widths", "8,8"),
         ("both given", "use one")),
    Case("train-unknown-activation", (*TRAIN, "--activation", "swish"),
         ("'swish'", "sigmoid", "softsign")),
    Case("train-unknown-init", (*TRAIN, "--init", "he"), ("init='he'", "kaiming_normal")),
    Case("train-negative-init-std", (*TRAIN, "--init", "normal:-1"),
         ("normal:-1", "positive number")),
    Case("train-zero-lr", (*TRAIN, "--lr", "0"), ("'--lr'", "x>0")),
    Case("train-nan-lr", (*TRAIN, "--lr", "nan"), ("lr=nan", "finite number > 0")),
    Case("train-lr-not-a-number", (*TRAIN, "--lr", "fast"), ("'--lr'", "'fast'", "float")),
    Case("train-zero-batch-size", (*TRAIN, "--batch-size", "0"), ("'--batch-size'", "1<=x")),
    Case("train-negative-seed", (*TRAIN, "--seed", "-1"), ("'--seed'", "0<=x")),
    Case("train-zero-train-size", (*TRAIN, "--train-size", "0"), ("'--train-size'", "x>=1")),
    Case("train-train-size-above-the-data", (*TRAIN, "--train-size", "100000"),
         ("train_size=100000", "give at most 512")),
    Case("train-unknown-option", (*TRAIN, "--depht", "3"), ("--depht", "--depth")),
    Case("train-unknown-device", (*TRAIN, "--device", "tpu"), ("'tpu'", "auto, cpu, cuda")),
    Case("train-absent-device", (*TRAIN, "--device", "cuda:99"),
         ("cuda:99 is not available", "use auto or cpu")),
    # -- gradlab train: paths and data -----------------------------------------------------
    Case("train-out-is-a-file", (*TRAIN[:-1], "{file}"), ("{file} is a file", "give a folder")),
    Case("train-out-under-a-file", (*TRAIN[:-1], "{file}/sub"),
         ("{file}/sub", "Not a directory", "give a folder path")),
    Case("train-out-under-proc", (*TRAIN[:-1], "/proc/gradlab-test/out"),
         ("/proc/gradlab-test/out", "give a folder path that can be written")),
    Case("train-data-missing", ("train", "--data-dir", "{empty}", "--out", "{out}"),
         ("{empty}/MNIST/raw", "train-images-idx3-ubyte, train-labels-idx1-ubyte")),
    Case("train-data-dir-is-a-file", ("train", "--data-dir", "{file}", "--out", "{out}"),
         ("'--data-dir'", "is a file")),
    Case("train-truncated-idx", ("train", "--data-dir", "{truncated}", "--out", "{out}"),
         ("truncated", "train-images-idx3-ubyte has 5000 bytes", "expected")),
    Case("train-non-mnist-images", ("train", "--data-dir", "{not_mnist}", "--out", "{out}"),
         ("does not hold mnist", "expected 28x28", "(512, 32, 32)")),
    Case("train-labels-out-of-range", ("train", "--data-dir", "{bad_labels}", "--out", "{out}"),
         ("does not hold mnist", "labels 0-9", "up to 11")),
    Case("train-a-data-file-missing", ("train", "--data-dir", "{no_test_labels}", "--out",
                                       "{out}"), ("not found", "t10k-labels-idx1-ubyte")),
    # -- gradlab sweep ---------------------------------------------------------------------
    Case("sweep-empty-list", (*SWEEP, "--depths", ""), ("'--depths'", "empty item")),
    Case("sweep-trailing-comma", (*SWEEP, "--depths", "3,"), ("'--depths'", "empty item")),
    Case("sweep-depth-above-limit", (*SWEEP, "--depths", "3,100"), ("'--depths'", "1<=x<=64")),
    Case("sweep-unknown-activation", (*SWEEP, "--activations", "sigmoid,swish"),
         ("'--activations'", "'swish'", "relu")),
    Case("sweep-negative-lr", (*SWEEP, "--lrs", "0.1,-1"), ("'--lrs'", "x>0")),
    Case("sweep-seed-not-an-integer", (*SWEEP, "--seeds", "0,a"), ("'--seeds'", "integer")),
    Case("sweep-zero-jobs", (*SWEEP, "--jobs", "0"), ("'--jobs'", "x>=1")),
    Case("sweep-unknown-executor", (*SWEEP, "--executor", "dask"), ("'dask'", "local", "ray")),
    Case("sweep-widths-not-matching-depth",
         (*SWEEP, "--depths", "2", "--widths", "8;8,8"),
         ("widths='8,8'", "depth 2 needs 1 hidden widths")),
    Case("sweep-train-size-above-the-data", (*SWEEP, "--train-sizes", "64,100000"),
         ("train_size=100000", "give at most 512")),
    Case("sweep-truncated-idx", (*SWEEP[:-4], "--data-dir", "{truncated}", "--out", "{out}"),
         ("truncated", "expected train-images-idx3-ubyte")),
    Case("sweep-out-is-a-file", (*SWEEP[:-1], "{file}"), ("is a file", "give a folder path")),
    Case("sweep-absent-device", (*SWEEP, "--device", "cuda:99"), ("cuda:99", "auto or cpu")),
    # -- gradlab plot / report / ls --------------------------------------------------------
    Case("plot-missing-folder", ("plot", "{out}"), ("{out} does not exist",
                                                     "give a results folder")),
    Case("plot-plain-folder", ("plot", "{plain}"),
         ("not a gradlab results folder", "expected {plain}/runs/<run_id>/")),
    Case("plot-results-without-runs", ("plot", "{no_runs}"), ("holds no runs",)),
    Case("plot-unknown-format", ("plot", "{res}", "--format", "png,gif"),
         ("'gif'", "png, pdf, svg")),
    Case("plot-unknown-figure", ("plot", "{res}", "--only", "nope"),
         ("'nope'", "grad_norm_by_layer")),
    Case("plot-figures-folder-is-a-file", ("plot", "{res_figures_file}"),
         ("figures is a file", "give a folder path")),
    Case("report-a-file", ("report", "{file}"), ("not a gradlab results folder", "expected")),
    Case("report-missing-folder", ("report", "{out}"), ("does not exist",
                                                         "give a results folder")),
    Case("report-page-path-is-a-folder", ("report", "{res_report_dir}"),
         ("cannot write", "report.html", "Is a directory")),
    Case("ls-missing-folder", ("ls", "{out}"), ("'PATH'", "does not exist")),
    Case("ls-a-file", ("ls", "{file}"), ("'PATH'", "is a file")),
    Case("ls-plain-folder", ("ls", "{plain}"), ("not a gradlab results folder", "expected")),
    # -- TOML specs (gradlab figures) ------------------------------------------------------
    Case("toml-malformed", FIG, ("malformed TOML", "Unclosed array"), "[[sweep]]\ndepth = [3\n"),
    Case("toml-malformed-value", FIG, ("malformed TOML", "at line 2"),
         "[[sweep]]\ndepth = = 3\n"),
    Case("toml-not-utf8", FIG, ("malformed TOML", "not UTF-8"), b"\xff\xfe depth = 3\n"),
    Case("toml-unknown-top-key", FIG, ("unknown key 'colour'", "description, sweep, figures"),
         "colour = 1\n[[sweep]]\ndepth = 3\n"),
    Case("toml-unknown-run-key", FIG, ("depht=3", RUN_KEYS), "[[sweep]]\ndepht = 3\n"),
    Case("toml-nested-table", FIG, ("foo=", RUN_KEYS), "[[sweep]]\ndepth = 3\n[sweep.foo]\n"),
    Case("toml-wrong-type-string", FIG, ("depth='3'", "an integer from 1 to 64"),
         "[[sweep]]\ndepth = '3'\n"),
    Case("toml-wrong-type-float", FIG, ("depth=3.5", "an integer from 1 to 64"),
         "[[sweep]]\ndepth = 3.5\n"),
    Case("toml-wrong-type-bool", FIG, ("lr=True", "a finite number > 0"),
         "[[sweep]]\nlr = true\n"),
    Case("toml-wrong-type-date", FIG, ("seed=datetime.date", "an integer from 0"),
         "[[sweep]]\nseed = 1979-05-27\n"),
    Case("toml-empty-list", FIG, ("depth=[]", "give at least one value"),
         "[[sweep]]\ndepth = []\n"),
    Case("toml-empty-sweep-table", FIG, ("[[sweep]] 1 is empty", "give run options"),
         "[[sweep]]\n"),
    Case("toml-no-sweep", FIG, ("at least one [[sweep]] table",), "description = 'x'\n"),
    Case("toml-depth-above-limit", FIG, ("depth=65", "from 1 to 64"),
         "[[sweep]]\ndepth = [3, 65]\n"),
    Case("toml-zero-width", FIG, ("width=0", "from 1 to 8192"), "[[sweep]]\nwidth = 0\n"),
    Case("toml-negative-train-size", FIG, ("train_size=-5", "an integer >= 1"),
         "[[sweep]]\ntrain_size = -5\n"),
    Case("toml-widths-not-matching-depth", FIG, ("widths='8,8'", "depth 2 needs 1 hidden"),
         "[[sweep]]\ndepth = [2, 3]\nwidths = [8, 8]\n"),
    Case("toml-unknown-format", FIG, ("figures.formats", "png, pdf, svg"),
         "[[sweep]]\ndepth = 3\n[figures]\nformats = ['gif']\n"),
    Case("toml-empty-formats", FIG, ("figures.formats = []", "a non-empty list of strings"),
         "[[sweep]]\ndepth = 3\n[figures]\nformats = []\n"),
    Case("toml-unknown-figure", FIG, ("figures.only has 'nope'", "grad_norm_by_layer"),
         "[[sweep]]\ndepth = 3\n[figures]\nonly = ['nope']\n"),
    Case("toml-not-a-toml-file", ("figures", "{file}", "--out", "{out}"),
         ("an experiment spec is a .toml file",)),
    Case("toml-missing-file", ("figures", "{plain}/nope.toml", "--out", "{out}"),
         ("nope.toml", "no such file")),
    Case("figures-unknown-device", (*FIG, "--device", "gpu"), ("'gpu'", "auto, cpu, cuda"),
         "[[sweep]]\ndepth = 3\n"),
]


def make_bad_data(root: Path) -> dict[str, Path]:
    """Fake MNIST folders, each damaged one way."""
    folders = {}
    for kind in ("truncated", "not_mnist", "bad_labels", "no_test_labels"):
        raw = write_fake_mnist(root / kind) / "MNIST" / "raw"
        images = raw / "train-images-idx3-ubyte"
        if kind == "truncated":
            images.write_bytes(images.read_bytes()[:5000])
        elif kind == "not_mnist":
            write_idx(images, np.zeros((512, 32, 32)))
        elif kind == "bad_labels":
            write_idx(raw / "train-labels-idx1-ubyte", np.full(512, 11))
        else:
            (raw / "t10k-labels-idx1-ubyte").unlink()
        folders[kind] = root / kind
    return folders


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> dict[str, Path]:
    return make_bad_data(tmp_path_factory.mktemp("bad_data"))


@pytest.fixture
def places(tmp_path, fake_mnist, bad_data, one_run, request) -> dict[str, str]:
    """The folders a case may name, made in ``tmp_path`` (the copies of conftest's ``one_run``
    only when the case uses them)."""
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_runs" / "runs").mkdir(parents=True)
    found = {"data": fake_mnist, "out": tmp_path / "o", "file": tmp_path / "afile",
             "plain": tmp_path / "plain", "empty": tmp_path / "empty",
             "no_runs": tmp_path / "no_runs", "spec": tmp_path / "spec.toml", **bad_data}
    argv = " ".join(request.node.callspec.params["case"].argv) if hasattr(
        request.node, "callspec") else ""
    for name, blocker in (("res", None), ("res_figures_file", "figures"),
                          ("res_report_dir", "report.html")):
        if "{" + name + "}" in argv or not argv:
            copy = tmp_path / name
            shutil.copytree(one_run, copy)
            if blocker == "figures":
                shutil.rmtree(copy / "figures", ignore_errors=True)  # the sweep's figures
                (copy / "figures").write_text("in the way\n")
            elif blocker == "report.html":
                (copy / "report.html").mkdir()
            found[name] = copy
    return {k: str(v) for k, v in found.items()}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder``; a file with its size and mtime."""
    return {str(p.relative_to(folder)): () if p.is_dir() else (p.stat().st_size,
                                                                 p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def check_one_line(output: str, needles: list[str]) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    line = lines[0]
    assert line.startswith("Error: "), line
    assert "Traceback" not in output
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def test_the_table_has_enough_cases_of_every_command():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert commands == {"train", "sweep", "plot", "report", "ls", "figures"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case, places, tmp_path):
    if case.spec is not None:
        spec = Path(places["spec"])
        spec.write_bytes(case.spec if isinstance(case.spec, bytes) else case.spec.encode())
    before = snapshot(tmp_path)
    r = CliRunner().invoke(cli, case.args(places))
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    check_one_line(r.output, [n.format_map(places) for n in case.needles])
    assert snapshot(tmp_path) == before  # nothing created, changed or left behind


# A few again in a real process (the slow tier): stderr holds the one line and nothing else,
# stdout nothing.
SUBPROCESS = ["toml-not-utf8", "sweep-truncated-idx", "report-page-path-is-a-folder",
              "train-out-under-proc", "train-absent-device"]


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS],
                         ids=lambda c: c.id)
def test_bad_input_in_a_real_process(case, places, tmp_path):
    if case.spec is not None:
        spec = Path(places["spec"])
        spec.write_bytes(case.spec if isinstance(case.spec, bytes) else case.spec.encode())
    before = snapshot(tmp_path)
    r = subprocess.run([sys.executable, "-m", "gradlab", *case.args(places)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    check_one_line(r.stderr, [n.format_map(places) for n in case.needles])
    assert snapshot(tmp_path) == before


def test_data_folder_names_are_torchvisions():
    """The data check names torchvision's folders without importing it; they must agree."""
    from gradlab.config import DATASETS
    from gradlab.data import FOLDERS, _dataset_class

    assert {name: _dataset_class(name).__name__ for name in DATASETS} == FOLDERS
