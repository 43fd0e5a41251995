"""``Watch.save``: a watched run written through the store's one run writer, so that it carries
the same files, digests and validation as a run gradlab trained."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pandas as pd
import torch

from ..store import EPOCH_COLUMNS, StoreError, close_run, ensure_out, open_run, provenance, run_dir
from .metrics import with_logged_loss

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def save_run(watched, out, name: str | None, config: dict | None, overwrite: bool,
             grads: pd.DataFrame, metrics: pd.DataFrame, time: pd.DataFrame) -> Path:
    """Write ``watched``'s records (a ``Watch``) as run ``name`` of ``out`` (see
    ``Watch.save``); returns the run folder."""
    settings = check_config(config or {})
    world = (torch.distributed.get_world_size()
             if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)
    described = [describe_optimizer(o) for o in watched.seen]
    about = {"layers": watched.layers(), "optimizers": described, "steps": watched.step,
             "world_size": world}
    if name is None:
        payload = json.dumps({"config": settings, "watched": about}, sort_keys=True, default=str)
        name = hashlib.sha256(payload.encode()).hexdigest()[:12]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"name={name!r} is invalid: 1-100 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")
    path = run_dir(out, name)
    if world > 1 and torch.distributed.get_rank() != 0:
        return path  # (rank 0 writes it: every rank's .grad is the same)
    if not overwrite and (path / "config.json").exists():
        raise StoreError(f"a run named {name!r} is already in {out}: give another name, or "
                         f"overwrite=True to replace it")
    device = str(watched.recorder.layers[0].value.device)
    path = open_run(ensure_out(out), name, {
        "source": "watch", "config": settings, "watched": about,
        "provenance": {**provenance(device), "started": watched._started}})
    close_run(path, name, {
        "grads": with_logged_loss(grads, metrics).drop(columns="run_id", errors="ignore"),
        "epochs": pd.DataFrame(columns=list(EPOCH_COLUMNS)),
        "metrics": metrics, "time": time},
        {"steps": watched.step, "seconds": None, "final_test_accuracy": None,
         "diverged_step": None, "error": None})
    return path


def check_config(config: dict) -> dict:
    """A copy of the user's config, checked: string keys and JSON scalar values (every key is
    the user's; gradlab's own description of the run goes under ``watched``)."""
    if not isinstance(config, dict):
        raise ValueError(f"config={config!r} is invalid: give a dict of JSON scalars")
    for key, value in config.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"config key {key!r} is invalid: a non-empty string")
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"config[{key!r}]={value!r} is invalid: a str, int, float, bool "
                             f"or None")
    return dict(config)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's type and each parameter group's scalar settings."""
    groups = [{k: v for k, v in group.items()
               if k != "params" and (v is None or isinstance(v, (str, int, float, bool)))}
              for group in optimizer.param_groups]
    return {"type": type(optimizer).__name__, "param_groups": groups}


