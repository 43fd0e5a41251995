"""Shared helpers of the benchmark scripts: interleaved repetitions, summaries, machine facts, and
writing a script's section of ``benchmarks/RESULTS.md``.

The machine these run on is shared, so every figure is a ratio against a baseline measured in the
same process and the same repetition, with the variants interleaved (their order rotated each
repetition) and summarised as the median of the repetitions with min–max. Each measurement records
wall time and process CPU time; with one torch thread the CPU time is what the step loop itself
consumed, which other processes on the machine disturb far less than the wall time.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float


def timed(fn: Callable[[], object]) -> tuple[Timing, object]:
    """Run ``fn`` once; its wall and process CPU seconds, and its return value."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return Timing(time.perf_counter() - w0, time.process_time() - c0), out


def interleaved(variants: dict[str, Callable[[], Timing]], reps: int,
                log: Callable[[str], None] | None = print) -> dict[str, list[Timing]]:
    """Run every variant once per repetition, rotating their order each repetition."""
    names = list(variants)
    out: dict[str, list[Timing]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(variants[name]())
        if log is not None:
            log(f"  rep {rep + 1}/{reps}: " + ", ".join(
                f"{n} {out[n][-1].wall:.3f}s" for n in names))
    return out


def summary(values: list[float], fmt: str = "{:.3g}") -> str:
    """``median (min–max)`` of the values."""
    return (f"{fmt.format(statistics.median(values))} "
            f"({fmt.format(min(values))}–{fmt.format(max(values))})")


def ratios(num: list[Timing], den: list[Timing], kind: str) -> list[float]:
    """Per-repetition ratios num/den of the ``wall`` or ``cpu`` seconds."""
    return [getattr(a, kind) / getattr(b, kind) for a, b in zip(num, den, strict=True)]


def set_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine() -> dict[str, str]:
    """The facts a result needs next to it: CPU model, cores, torch, threads, load, device."""
    model = platform.processor() or "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        model = found.group(1).strip() if found else model
    except (OSError, subprocess.CalledProcessError):
        pass
    facts = {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "load average at start (1 min)": f"{os.getloadavg()[0]:.2f}",
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section(title: str, command: str, facts: dict[str, str], body: str) -> str:
    """A RESULTS.md section: the figures, the exact command, the machine."""
    facts_line = "; ".join(f"{k}: {v}" for k, v in facts.items())
    return (f"## {title}\n\nCommand: `{command}`\n\nMachine: {facts_line}; "
            f"load average at end (1 min): {os.getloadavg()[0]:.2f}\n\n{body.strip()}\n")


def write_section(key: str, text: str, path: Path = RESULTS) -> None:
    """Replace the section between ``<!-- key -->`` markers in RESULTS.md, or append it."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    old = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


# The two ways gradlab trains one run (``gradlab train --engine …``): ``autograd`` (the default:
# autograd, torch.optim and the hook GradientRecorder) and ``fused`` (the stacked engine with one
# member, recording folded into the SGD pass by gradlab.engines.fused; what train_ensemble
# stacks).
PATHS = ("autograd", "fused")
PATH_NOTE = (
    "`autograd`: `RunConfig.engine=\"autograd\"` (the default), autograd + `torch.optim` + "
    "the hook `GradientRecorder`; `fused`: `RunConfig.engine=\"fused\"`, the stacked engine "
    "(`gradlab/engines/stacked.py`) with one member, its recording folded into the SGD pass and "
    "its last layer's step done in one pass by `gradlab/engines/fused.py`, its first layer's "
    "products over the nonzero pixels only (`gradlab/engines/sparse.py`).")


def train_path(path: str, config, data, device):
    """One run of ``config`` by ``path`` (see PATHS)."""
    import dataclasses

    from gradlab.train import train

    return train(dataclasses.replace(config, engine=path), data=data, device=device)
