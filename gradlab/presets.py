"""What ``gradlab sweep`` trains for the options it is not given: its preset.

``story`` (the default) is the comparison gradlab exists for, with the recipe of
``experiments/quickstart.toml`` (the same runs, so the same numbers): sigmoid, ReLU with
PyTorch's default init and ReLU with Kaiming init, at depth 3, 5 and 10, width 128, 3 epochs on
the first 12,000 MNIST training examples, batch 32, lr 0.1, seed 0; nine runs, about a minute
on 2 CPU cores. ``train`` gives every option not given ``gradlab train``'s default instead.
Either way it stays a grid: each option given replaces the preset's values for that option.
"""

from __future__ import annotations

from typing import Any

PRESETS = ("story", "train")
# (activation, init): ReLU twice, so that the init's part is seen beside the activation's
STORY_SETUPS = (("sigmoid", "default"), ("relu", "default"), ("relu", "kaiming_normal"))
STORY = {"depth": [3, 5, 10], "width": 128, "lr": 0.1, "batch_size": 32, "epochs": 3,
         "train_size": 12000, "seed": 0}
PRESET_HELP = ("the values of the options not given. story: sigmoid, ReLU (PyTorch's default "
               "init) and ReLU with kaiming_normal, depth 3,5,10, width 128, 3 epochs on 12000 "
               "examples, batch 32 (experiments/quickstart.toml's runs, about a minute on 2 "
               "cores); train: gradlab train's defaults")


def story_default(field: str) -> str | None:
    """The story's default of a run option as --help shows it (None: gradlab train's)."""
    if field == "activation":
        return "sigmoid,relu (see --preset)"
    if field == "init":
        return "default, and kaiming_normal for relu (see --preset)"
    value = STORY.get(field)
    return ",".join(map(str, value)) if isinstance(value, list) else value


def sweep_grids(given: dict[str, Any], preset: str = "story") -> list[dict[str, Any]]:
    """The grids that a sweep trains (``gradlab.config.expand_grids`` takes them).

    Args:
        given: the run options given (field -> list of values, as ``gradlab sweep`` parses
            them; ``width`` a list of widths, one for every hidden layer; ``widths`` a list of
            one net's hidden widths each).
        preset: ``story`` or ``train`` (see the module's docstring).
    """
    if preset == "train":
        return [dict(given)]
    if preset != "story":
        raise ValueError(f"preset={preset!r}: one of {', '.join(PRESETS)}")
    base = {k: v for k, v in STORY.items() if k not in given}
    if "width" in given or "widths" in given:
        base.pop("width", None)
        if "widths" in given:  # one net's widths give its depth, as in gradlab train
            base.pop("depth", None)
    if "activation" in given or "init" in given:  # the user's own setups: their cross product
        activations = {} if "activation" in given else {
            "activation": list(dict.fromkeys(a for a, _ in STORY_SETUPS))}
        return [{**base, **activations, **given}]
    return [{**base, "activation": activation, "init": init, **given}
            for activation, init in STORY_SETUPS]


def widths_note(given: dict[str, Any]) -> str | None:
    """A line for a sweep given one ``--widths`` list of several values: before this version
    ``gradlab sweep --widths 64,128`` meant two nets of one width each; it now means one net's
    hidden widths, as in ``gradlab train``, and the reader should see that."""
    lists = given.get("widths")
    if not lists or len(lists) != 1 or len(lists[0]) < 2:
        return None
    sizes = "→".join(map(str, (784, *lists[0], 10)))
    text = ",".join(map(str, lists[0]))
    return (f"note: --widths {text} is one net's hidden widths ({sizes}), as in gradlab "
            f"train; nets of one width each are --width {text}")
