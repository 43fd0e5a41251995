"""Results shaped like ``gradlab.load``'s at the edges a first report meets: one epoch, one
seed, one depth, one recorded step, a folder that mixes configurations, and a frame without
facet columns (as ``gradlab.watch`` records it). Values come from a seeded generator."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd

from gradlab.store import Results


def make_results(setups: list[dict], *, depths=(3, 5), seeds=(0, 1), steps: int = 6,
                 epochs: int = 3, seed: int = 0) -> Results:
    """One run per setup × depth × seed; ``setups`` are dicts of config columns (activation,
    init, lr, ...). ``steps`` recorded steps spread over ``epochs`` epochs."""
    rng = np.random.default_rng(seed)
    grads, rows, runs = [], [], []
    for setup, depth, s in itertools.product(setups, depths, seeds):
        run = dict(run_id=f"r{len(runs):03d}", depth=depth, seed=s, **setup,
                   status="complete", diverged_step=None)
        sigmoid = setup.get("activation") == "sigmoid"
        for step in range(steps):
            for layer in range(depth):
                hidden = layer < depth - 1
                grads.append(dict(
                    run, step=step, epoch=1 + step * epochs // steps, layer=layer,
                    grad_weight_norm=10 ** rng.uniform(-2 - 0.8 * sigmoid * (depth - layer), 0),
                    act_grad_mean=rng.uniform(0.1, 0.25 if sigmoid else 0.9) if hidden
                    else math.nan,
                    saturated_frac=rng.uniform() if hidden and sigmoid else math.nan,
                    dead_frac=rng.uniform(0, 0.2) if hidden and not sigmoid else math.nan))
        for epoch in range(1, epochs + 1):
            for split in ("train", "test"):
                rows.append(dict(run, epoch=epoch, split=split,
                                 accuracy=rng.uniform(0.94, 0.99), loss=rng.uniform(0.05, 0.3)))
        runs.append(dict(run, final_test_accuracy=rows[-1]["accuracy"]))
    return Results(pd.DataFrame(grads), pd.DataFrame(rows), pd.DataFrame(runs))


TWO = [{"activation": "sigmoid", "init": "default"}, {"activation": "relu", "init": "default"}]
MIXED = [  # what a folder holds after a sweep, a train with another lr and an init study
    {"activation": "sigmoid", "init": "default", "lr": 0.1, "batch_size": 64},
    {"activation": "relu", "init": "default", "lr": 0.1, "batch_size": 64},
    {"activation": "relu", "init": "kaiming_normal", "lr": 0.1, "batch_size": 64},
    {"activation": "tanh", "init": "xavier_normal", "lr": 0.1, "batch_size": 64},
    {"activation": "sigmoid", "init": "default", "lr": 0.01, "batch_size": 64},
    {"activation": "relu", "init": "kaiming_normal", "lr": 0.01, "batch_size": 256},
]

CASES = {
    "one_epoch": dict(setups=TWO, epochs=1),
    "one_seed": dict(setups=TWO, seeds=(0,)),
    "one_depth": dict(setups=TWO, depths=(3,)),
    "one_step": dict(setups=TWO, steps=1, epochs=1),
    "minimal": dict(setups=TWO[:1], depths=(3,), seeds=(0,), steps=1, epochs=1),
    "mixed": dict(setups=MIXED, depths=(3, 5, 10), seeds=(0,), steps=12, epochs=2),
}


def case(name: str) -> Results:
    return make_results(**CASES[name])


def watch_frame(steps: int = 5, layers: int = 4, seed: int = 0) -> pd.DataFrame:
    """A frame as ``gradlab.watch(...).flush()`` returns it: step, layer, layer_name and the
    recorded columns, without run_id, epoch, depth, activation, seed or status."""
    rng = np.random.default_rng(seed)
    rows = [dict(step=step, layer=layer, layer_name=f"net.{layer}",
                 grad_output_norm=rng.uniform(0.1, 1), grad_weight_norm=rng.uniform(0.1, 1),
                 act_grad_mean=rng.uniform(0.1, 0.9) if layer < layers - 1 else math.nan,
                 saturated_frac=math.nan,
                 dead_frac=rng.uniform(0, 0.3) if layer < layers - 1 else math.nan,
                 loss=rng.uniform(0.1, 2))
            for step in range(steps) for layer in range(layers)]
    return pd.DataFrame(rows)
