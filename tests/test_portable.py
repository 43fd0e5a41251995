"""The portable CPU mode (gradlab.portable): the same records whatever CPU capability a process
starts with, in fresh processes and in the pool workers of a process that loaded torch first;
the machine in the manifest; the flags of train and sweep."""

import json
import os
import subprocess
import sys

import pytest

from gradlab import portable
from gradlab.experiment import build, load_spec

from .helpers import assert_same_records, invoke

SPEC = """
description = "tiny, for the portable mode"

[[sweep]]
depth = 3
width = 16
activation = "sigmoid"
init = "kaiming_normal"
epochs = 1
train_size = 256
batch_size = 32
seed = 0

[figures]
only = ["vanishing_ratio"]
"""
# Two CPU capabilities as the libraries see them: ATen's vectorised kernels at AVX2 or unvectorised,
# numba compiling for the host or for a generic x86-64, MKL's own dispatch or its AVX2 branch.
CAPABILITIES = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "NUMBA_CPU_NAME": "generic",
                 "MKL_CBWR": "AUTO"},
}

needs_mode = pytest.mark.skipif(portable.unavailable() is not None,
                                reason=str(portable.unavailable()))


@pytest.fixture(autouse=True)
def own_environment(monkeypatch):
    """Whatever a test does to the mode's settings is undone after it."""
    for key in portable.SETTINGS:
        monkeypatch.delenv(key, raising=False)


def build_in_process(spec, out, data, capability, mode):
    """``gradlab figures`` in a fresh process whose environment claims ``capability``."""
    env = {k: v for k, v in os.environ.items() if k not in portable.SETTINGS}
    env.update({**CAPABILITIES[capability], "NUMBA_CACHE_DIR": str(out.parent / "numba")})
    done = subprocess.run([sys.executable, "-m", "gradlab", "figures", str(spec), "--out",
                           str(out), "--data-dir", str(data), "-j", "1", f"--{mode}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads((out / "manifest.json").read_text())


@needs_mode
@pytest.mark.slow  # five builds, four of them in their own processes
def test_portable_records_are_the_same_under_two_cpu_capabilities(tmp_path, fake_mnist):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    built = {(cap, mode): build_in_process(spec, tmp_path / f"{cap}-{mode}", fake_mnist, cap,
                                           mode)
             for cap in CAPABILITIES for mode in ("portable", "native")}
    # natively the two capabilities give other records: the settings reach the kernels
    assert (built["avx2", "native"]["records_sha256"]
            != built["baseline", "native"]["records_sha256"])
    # in the portable mode they do not
    assert (built["avx2", "portable"]["records_sha256"]
            == built["baseline", "portable"]["records_sha256"])
    assert_same_records(tmp_path / "baseline-portable", tmp_path / "avx2-portable")
    assert (built["avx2", "portable"]["figures"] == built["baseline", "portable"]["figures"])
    machine = built["baseline", "portable"]["machine"]
    assert machine["portable"] and machine["portable_in_this_process"]
    assert machine["aten_cpu_capability"] == "AVX2"
    assert machine["blas_mode"] == "MKL_CBWR=COMPATIBLE"
    assert built["baseline", "native"]["machine"]["aten_cpu_capability"] == "DEFAULT"
    assert not built["baseline", "native"]["portable"]
    # this process loaded torch before the settings: its runs train in a fresh worker, in the
    # mode, and give the same records; its environment is left as it was
    manifest = build(load_spec(spec), tmp_path / "here", data_dir=str(fake_mnist),
                     portable=True)
    assert manifest["records_sha256"] == built["avx2", "portable"]["records_sha256"]
    assert manifest["portable"] and not manifest["machine"]["portable_in_this_process"]
    assert not any(key in os.environ for key in portable.SETTINGS)


def test_manifest_names_the_machine(tmp_path, fake_mnist):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    manifest = build(load_spec(spec), tmp_path / "out", data_dir=str(fake_mnist))
    machine = manifest["machine"]
    assert machine["cpu"] and machine["arch"]
    assert set(machine["cpu_flags"]) <= set(portable.ISA_FLAGS)
    assert machine["threads_per_run"] == 1 and machine["portable"] is False
    assert machine["blas"] and machine["aten_cpu_capability"]
    assert manifest["portable"] is False
    import torch

    assert machine["torch"] == torch.__version__ == manifest["versions"]["torch"]


@needs_mode
def test_enter_and_leave_restore_the_environment(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    in_effect, previous = portable.enter()
    assert not in_effect  # torch loaded in this process before
    assert portable.set_in(os.environ) and os.environ["MKL_CBWR"] == "COMPATIBLE"
    portable.leave(previous)
    assert os.environ["MKL_CBWR"] == "AVX2"
    assert "ATEN_CPU_CAPABILITY" not in os.environ


def test_a_cpu_without_avx2_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(portable, "cpu_flags", lambda: {"sse2", "avx"})
    monkeypatch.setattr(portable.platform, "machine", lambda: "x86_64")
    assert "lacks avx2, fma" in portable.unavailable()
    with pytest.raises(portable.PortableError, match="use --native"):
        portable.enter()
    monkeypatch.setattr(portable.platform, "machine", lambda: "arm64")
    assert "x86-64" in portable.unavailable()


def test_train_portable_needs_a_fresh_process(tmp_path, fake_mnist):
    """In a process that loaded torch first, train --portable cannot pin its own kernels:
    one line, nothing trained."""
    if portable.unavailable() is not None:
        pytest.skip(portable.unavailable())
    r = invoke("train", "--portable", "--epochs", "1", "--train-size", "64", "--data-dir",
               fake_mnist, "--out", tmp_path / "out", "-q")
    assert r.exit_code == 2, r.output
    assert "must be set before torch loads" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out" / "runs").exists()


def test_figures_falls_back_to_native_where_the_mode_cannot_run(tmp_path, monkeypatch,
                                                                fake_mnist):
    monkeypatch.setattr(portable, "unavailable", lambda: "no AVX2 here")
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    r = invoke("figures", spec, "--out", tmp_path / "out", "--data-dir", fake_mnist, "-j", "1")
    assert r.exit_code == 0, r.output
    assert "Warning: no AVX2 here: building in the native mode" in r.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["portable"] is False
    r = invoke("figures", spec, "--portable", "--out", tmp_path / "out2", "--data-dir",
               fake_mnist)
    assert r.exit_code == 2 and "no AVX2 here: use --native" in r.output
