"""Every fault a clear line (issue 17): SIGTERM is handled as Ctrl-C, Ctrl-C during start-up
gives no traceback, an unreachable Ray cluster is one line in bounded time, ``gradlab train``
takes the run lock a sweep takes, and a path name too long is one line.

Signals go to real processes, started with SIGINT and SIGTERM at their defaults (a test runner
started in the background inherits SIGINT ignored). The moments come from a seeded RNG. Real
processes, worker pools and Ray are the slow tier; the run lock and long path names are fast.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from gradlab.config import expand_grid
from gradlab.locks import run_lock
from gradlab.sweep import run_sweep

from .helpers import gradlab_process, invoke, lines, statuses, sweep, wait_for_file

GRID = ["--depths", "2,3", "--activations", "sigmoid,relu", "--preset", "train", "--width", "32",
        "--epochs", "60", "--train-sizes", "512"]
INTERRUPTED = "Interrupted: finished runs are kept; run the same command again to resume."


def default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def gradlab(*args) -> subprocess.Popen:
    return gradlab_process(*args, preexec_fn=default_signals)


def wait_for(proc: subprocess.Popen, out, what: str) -> None:
    """Wait until a run of ``out`` has begun (``config.json``) or finished (``status.json``)."""
    wait_for_file(proc, out, f"runs/*/{what}", timeout=240, poll=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigterm_stops_a_sweep_as_ctrl_c_does(fake_mnist, tmp_path, jobs):
    """SIGTERM to the sweep alone (as ``timeout`` or a scheduler sends it): the Interrupted
    line, exit 143, the finished runs kept, no leaked semaphores, no process left."""
    out = tmp_path / "sweep"
    proc = gradlab("sweep", *GRID, "-j", jobs, "--data-dir", fake_mnist, "--out", out)
    wait_for(proc, out, "status.json")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert lines(stderr)[-1] == INTERRUPTED, stderr
    for word in ("Traceback", "leaked", "Error", "Terminated"):
        assert word not in stderr, stderr
    assert stdout == ""
    kept = statuses(out)
    assert 1 <= len(kept) < 4 and set(kept.values()) == {"complete"}
    again = sweep(fake_mnist, out, grid=GRID)
    assert again.exit_code == 0 and f"{len(kept)} already finished" in again.stderr


@pytest.mark.slow
def test_sigterm_stops_train_as_ctrl_c_does(fake_mnist, tmp_path):
    out = tmp_path / "train"
    proc = gradlab("train", "--depth", 3, "--width", 64, "--epochs", 200, "--train-size", 512,
                   "--data-dir", fake_mnist, "--out", out)
    wait_for(proc, out, "config.json")
    time.sleep(1.0)  # inside training
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143 and lines(stderr)[-1] == INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert statuses(out) == {}  # the run stays unfinished: the next command trains it


def python_start_up_seconds() -> float:
    """How long the interpreter takes to start here (before any gradlab code can run)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def before_gradlab(returncode: int, stderr: str, signum: int) -> bool:
    """Whether a signal came before any gradlab code ran (the interpreter's own start-up, out
    of gradlab's hands): the default action killed the process, or the traceback has no frame
    of gradlab's."""
    return returncode == -signum or (
        "Traceback" in stderr and "gradlab" not in "".join(
            line for line in stderr.splitlines() if line.lstrip().startswith("File ")))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_is_one_line(one_run, signum):
    """Ctrl-C or SIGTERM while the command is still importing: no traceback, one line. A
    signal that a slow machine delivers before gradlab's first line ran is not counted (and
    another moment is tried); at least four signals must land in gradlab's start-up."""
    start = python_start_up_seconds()
    rng = random.Random(17 + signum)
    landed = 0
    for _ in range(20):
        proc = gradlab("ls", one_run)
        time.sleep(start + rng.uniform(0.0, 0.3))
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
        if before_gradlab(proc.returncode, stderr, signum):
            continue
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
        if proc.returncode != 0:  # else it ended before the signal
            assert proc.returncode == 128 + signum, stderr
            assert len(lines(stderr)) == 1 and "Interrupted" in stderr, stderr
        landed += 1
        if landed == 6:
            break
    assert landed >= 4


@pytest.mark.slow
def test_an_unreachable_ray_cluster_is_one_line_in_bounded_time(fake_mnist, tmp_path):
    pytest.importorskip("ray")
    t0 = time.monotonic()
    proc = gradlab("sweep", "--depths", "2", "--preset", "train", "--width", "8", "--epochs", "1",
                   "--train-sizes", "64", "--executor", "ray", "--ray-address", "127.0.0.1:1",
                   "--data-dir", fake_mnist, "--out", tmp_path / "o")
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode != 0 and stdout == ""
    (line,) = lines(stderr)
    assert line.startswith("Error: cannot reach a Ray cluster at 127.0.0.1:1"), stderr
    assert not (tmp_path / "o").exists()  # nothing written


def test_train_takes_the_run_lock(fake_mnist, tmp_path):
    """A second process on the same config says "running elsewhere" and trains nothing."""
    args = ["--depth", "2", "--width", "8", "--epochs", "1", "--train-size", "64"]
    (config,) = expand_grid({"depth": 2, "width": 8, "epochs": 1, "train_size": 64})
    out = tmp_path / "o"
    (out / "runs").mkdir(parents=True)
    with run_lock(out, config.run_id()) as locked:
        assert locked
        r = invoke("train", *args, "--data-dir", fake_mnist, "--out", out)
    assert r.exit_code == 1
    (line,) = lines(r.output)
    assert config.run_id() in line and "running elsewhere" in line and "nothing trained" in line
    assert not (out / "runs" / config.run_id()).exists()
    r = invoke("train", *args, "--data-dir", fake_mnist, "--out", out, "-q")
    assert r.exit_code == 0 and statuses(out) == {config.run_id(): "complete"}


LONG = "x" * 300  # over the 255 bytes a path component may have


@pytest.mark.parametrize("args", [
    ["sweep", "--depths", "2", "--preset", "train", "--width", "8", "--epochs", "1",
     "--train-sizes", "64", "--out", "{tmp}/" + LONG],
    ["train", "--depth", "2", "--width", "8", "--epochs", "1", "--train-size", "64",
     "--out", "{tmp}/" + LONG + "/o"],
    ["train", "--depth", "2", "--width", "8", "--epochs", "1", "--data-dir", "{tmp}/" + LONG],
    ["plot", "{tmp}/" + LONG],
    ["report", "{tmp}/" + LONG],
    ["ls", "{tmp}/" + LONG],
    ["figures", "{tmp}/" + LONG + ".toml"],
])
def test_a_path_name_too_long_is_one_line(fake_mnist, tmp_path, args):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(fake_mnist)] if args[0] in ("train", "sweep") else []
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    (line,) = lines(r.output)
    assert line.startswith("Error:") and "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.mark.slow  # worker processes
def test_on_progress_reports_every_run_inline_and_from_pool_workers(fake_mnist, tmp_path):
    """run_sweep's on_progress is called in this process for runs trained here and in worker
    processes, ending at (steps, steps) for each run."""
    configs = expand_grid({"depth": [2, 3], "width": 8, "epochs": 1, "train_size": 128})
    for jobs in (1, 2):
        calls: list[tuple[str, int, int]] = []
        out = tmp_path / f"j{jobs}"
        result = run_sweep(configs, out, jobs=jobs, data_dir=str(fake_mnist),
                           on_progress=lambda *call, calls=calls: calls.append(call))
        assert result.ok
        for config in configs:
            mine = [(done, total) for run_id, done, total in calls if run_id == config.run_id()]
            steps = json.loads((out / "runs" / config.run_id() / "status.json").read_text())
            assert mine and mine[-1] == (steps["steps"], steps["steps"]), (jobs, calls)
            assert [d for d, _ in mine] == sorted(d for d, _ in mine)


def ray_processes() -> set[int]:
    """Ray's own processes now running on this machine (raylet, GCS server, workers)."""
    found = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True,
                           text=True).stdout.split()
    return {int(pid) for pid in found}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["starting ray", "first run trained", "after a finished run"])
def test_ctrl_c_stops_a_ray_sweep_at_every_stage(fake_mnist, tmp_path, stage):
    """Ctrl-C while the local Ray cluster starts, while its first run trains, and after a run
    finished: the Interrupted line, exit 130, no traceback, finished runs kept, and none of
    the Ray processes it started left running."""
    pytest.importorskip("ray")
    before = ray_processes()
    out = tmp_path / "sweep"
    proc = gradlab("sweep", *GRID, "--executor", "ray", "-j", 2, "--data-dir", fake_mnist,
                   "--out", out)
    if stage == "starting ray":
        deadline = time.monotonic() + 120
        while not ray_processes() - before:  # the cluster's first process is up
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
    elif stage == "first run trained":
        wait_for(proc, out, "config.json")
        time.sleep(1.0)
    else:
        wait_for(proc, out, "status.json")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert lines(stderr)[-1] == INTERRUPTED, stderr
    assert "Traceback" not in stderr and stdout == ""
    if (out / "runs").is_dir():
        assert set(statuses(out).values()) <= {"complete"}
    deadline = time.monotonic() + 30  # Ray's processes exit on their own schedule
    while ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ray_processes() - before, "Ray processes left running"
