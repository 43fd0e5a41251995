"""One run end to end: load data, train, and store the results in the layout of ``store``."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable

from .config import RunConfig
from .data import load_data
from .store import begin_run, ensure_out, finish_run
from .train import RunResult, resolve_device, train


def execute(
    config: RunConfig,
    out: str | os.PathLike,
    *,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train ``config`` and write ``out/runs/<run_id>/``; returns the status dict.

    Data errors propagate (nothing is written for a run that never started). Any failure
    during training is stored as status ``failed`` with whatever records were made, so one bad
    run never takes a sweep down; KeyboardInterrupt leaves the run unfinished (no status file),
    and it is redone next time.
    """
    out = ensure_out(out)
    dev = resolve_device(device)
    data = load_data(config.dataset, data_dir, device=dev, train_size=config.train_size,
                     standardize=config.standardize)
    path = begin_run(out, config, str(dev))
    try:
        result = train(config, data=data, device=dev, progress=progress, on_epoch=on_epoch,
                       on_step=on_step)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # stored, not raised: the sweep goes on
        result = RunResult.failed(config, str(dev), e)
        (path / "error.txt").write_text(traceback.format_exc())
    return finish_run(path, result)

