"""The portable CPU mode: settings under which a run's float kernels compute the same bits on
every x86-64 CPU with AVX2 and FMA, Intel or AMD, set in the environment before torch, MKL,
numba and numpy load (they read them once, at load).

Found by experiment (issue 27; README "Rebuilding the figures"), on an AMD EPYC and on an Intel
Haswell as ``qemu-x86_64 -cpu Haswell-v4`` presents it:

* ``MKL_CBWR=COMPATIBLE``: MKL's SSE2 code branch, the only one that Intel and AMD CPUs run
  alike. Its ISA branches (``MKL_CBWR=AVX2``...) hold only on Intel CPUs: on others MKL falls
  back to its own dispatch, so an AMD CPU's AVX2 branch is not an Intel CPU's.
* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (activations, softmax, sums, and
  ``torch.randn``'s normal sampler, so the initial weights too) at AVX2 even on an AVX-512 CPU.
  ATen does not check that the CPU has it (avx512 on an AVX2 CPU is an illegal instruction), so
  the mode is refused on a CPU without AVX2 and FMA.
* ``NUMBA_CPU_NAME=x86-64-v3`` with no features of the host added: numba compiles the
  recorder's kernels (whose float32 sums may be reassociated) for the AVX2 level, not for the
  host CPU, whose vector width and tuning change how they are split.
* ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA=AVX2`` and ``NPY_DISABLE_CPU_FEATURES`` (numpy's
  AVX-512 loops): oneDNN (convolutions) and numpy (tables, figures) at the same level.

Threads are already fixed (one per run, ``gradlab.sweep.THREADS``). The mode is on by default
for ``gradlab figures`` and a flag of ``gradlab train`` / ``gradlab sweep``; pool workers
inherit it from the environment and Ray tasks get it as their ``runtime_env``.
"""

from __future__ import annotations

import os
import platform
import sys

from .errors import GradlabError

# numpy's names of its AVX-512 dispatch targets, since 2.4 (X86_V4...) and before (AVX512F...)
_NUMPY_AVX512 = ("X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_KNL AVX512_KNM "
                 "AVX512_SKX AVX512_CLX AVX512_CNL")
SETTINGS: dict[str, str] = {
    "MKL_CBWR": "COMPATIBLE",
    "ATEN_CPU_CAPABILITY": "avx2",
    "NUMBA_CPU_NAME": "x86-64-v3",
    "NUMBA_CPU_FEATURES": "",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "NPY_DISABLE_CPU_FEATURES": _NUMPY_AVX512,
}
NEEDED_FLAGS = ("avx2", "fma")  # every CPU that runs the pinned code paths has these
LIBRARIES = ("torch", "numpy", "numba")  # those that read SETTINGS when they load
# the CPU flags worth naming in a manifest: those that change which kernels run
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "amx_tile")


class PortableError(GradlabError, RuntimeError):
    """The portable mode cannot be used here; the message is one line."""


def set_in(environ) -> bool:
    """Whether ``environ`` holds every setting of the mode."""
    return all(environ.get(k) == v for k, v in SETTINGS.items())


# Whether the settings were there when gradlab.portable was first imported: then they were
# there when the libraries loaded (a shell's export, or a parent in the mode).
_SET_AT_START = set_in(os.environ)
_SET_BEFORE_LOAD = False  # set by ``enter`` when no library had loaded yet


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (empty where they cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name (``platform.processor()`` where /proc/cpuinfo is not there)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def unavailable() -> str | None:
    """Why the mode cannot run on this machine, or None when it can."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return f"the portable CPU mode is for x86-64 CPUs; this one is {machine or 'unknown'}"
    flags = cpu_flags()
    missing = [f for f in NEEDED_FLAGS if f not in flags]
    if missing:
        return (f"the portable CPU mode needs a CPU with AVX2 and FMA; "
                f"{'this CPU lacks ' + ', '.join(missing) if flags else 'cannot read its flags'}")
    return None


def loaded() -> list[str]:
    """The libraries that read the settings and are loaded in this process already."""
    return [name for name in LIBRARIES if name in sys.modules]


def in_effect() -> bool:
    """Whether this process computes in the mode: the settings are set and were set before
    the libraries loaded."""
    return set_in(os.environ) and (_SET_AT_START or _SET_BEFORE_LOAD)


def enter() -> tuple[bool, dict | None]:
    """Put the settings into this process's environment, for it (when no library has loaded
    yet) and for every process it starts (pool workers inherit them).

    Returns ``(in_effect(), previous)``: in effect is False when torch, numpy or numba loaded
    before, and then runs must train in fresh processes (``gradlab.sweep.run_sweep`` does);
    ``previous`` is what ``leave`` puts back (None when the settings were there already).
    Raises PortableError on a CPU that cannot run the mode."""
    global _SET_BEFORE_LOAD
    reason = unavailable()
    if reason is not None:
        raise PortableError(f"{reason}: use --native")
    previous = None
    if not set_in(os.environ):
        previous = {k: os.environ.get(k) for k in SETTINGS}
        fresh = not loaded()
        os.environ.update(SETTINGS)
        _SET_BEFORE_LOAD = fresh
    return in_effect(), previous


def leave(previous: dict | None) -> None:
    """Put back the environment that ``enter`` changed (a command run inside another
    program, such as a test, leaves it as it found it)."""
    global _SET_BEFORE_LOAD
    if previous is None:
        return
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SET_BEFORE_LOAD = False


def machine(portable: bool, threads: int) -> dict:
    """What a build ran on, for its manifest: the CPU, its flags that pick kernels, the code
    paths in use (ATen's capability, BLAS and its mode, numba's target, numpy's loops), the
    libraries' versions, threads, and whether the mode was on."""
    import numpy
    import torch

    flags = cpu_flags()
    facts = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cpu_flags": [f for f in ISA_FLAGS if f in flags],
        "portable": portable,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": _blas(torch),
        "blas_mode": (f"MKL_CBWR={os.environ['MKL_CBWR']}" if os.environ.get("MKL_CBWR")
                      else "MKL_CBWR unset (MKL picks its branch by CPU)"),
        "numba": _numba(),
        "numpy_simd": _numpy_simd(numpy),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "threads_per_run": threads,
        "settings": {k: os.environ[k] for k in SETTINGS if k in os.environ},
        "os": platform.platform(terse=True),
    }
    return facts


def _blas(torch) -> str:
    import re

    config = torch.__config__.show()
    found = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    if found:
        return f"MKL {found.group(1)}"
    found = re.search(r"BLAS_INFO=(\w+)", config)
    return found.group(1) if found else "unknown"


def _numba() -> dict | None:
    try:
        import numba
        from numba.core import config
    except ImportError:
        return None
    target = config.CPU_NAME
    if target is None:
        import llvmlite.binding as ll

        target = f"host ({ll.get_host_cpu_name()})"
    return {"version": numba.__version__, "target": target}


def _numpy_simd(numpy) -> list[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__
        except ImportError:
            return []
    return [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
