"""What a new user finds: the public names in help(gradlab), figure functions named as the
figures, a short repr of loaded results, and docstrings that point only inside the repository."""

from __future__ import annotations

import pydoc
from pathlib import Path

import pandas as pd

import gradlab
from gradlab import plots
from gradlab.store import Results


def test_help_lists_the_api():
    text = pydoc.render_doc(gradlab, renderer=pydoc.plaintext)
    for name in ("gradlab.load", "gradlab.plots", "gradlab.tables", "vanishing_ratio",
                 "grad_norm_by_layer", "final_accuracy_table", "write_report"):
        assert name in text, name
    assert gradlab.plots is plots and gradlab.tables.vanishing_ratios is plots.vanishing_ratios


def test_figure_functions_are_named_as_the_figures():
    for name in plots.FIGURES:
        assert callable(getattr(plots, name)), name
    assert plots.vanishing_ratio_plot is plots.vanishing_ratio  # the old name still works


def test_results_repr_is_one_short_line():
    runs = pd.DataFrame({"run_id": ["a", "b", "c"],
                         "status": ["complete", "complete", "diverged"]})
    grads = pd.DataFrame({"run_id": ["a"] * 1000, "step": range(1000)})
    text = repr(Results(grads, pd.DataFrame(), runs, ["x: damaged"]))
    assert text == ("Results(3 runs (2 complete, 1 diverged); grads 1000 rows, epochs 0 rows, "
                    "1 problems)")


def test_docstrings_name_no_document_outside_the_repository():
    package = Path(gradlab.__file__).parent
    for path in package.rglob("*.py"):
        assert "DESIGN" not in path.read_text(encoding="utf-8"), path


def story_frames():
    """Two setups × depths 3 and 10, one step each: relu keeps its gradient (ratio 2), sigmoid
    loses it at depth 10 (ratio 1e-6); final accuracies 0.9 and 0.1."""
    grads, epochs, runs = [], [], []
    for activation, deep_ratio, deep_acc in (("relu", 2.0, 0.9), ("sigmoid", 1e-6, 0.1)):
        for depth in (3, 10):
            run = dict(run_id=f"{activation}{depth}", activation=activation, depth=depth,
                       seed=0, status="complete")
            ratio = 2.0 if depth == 3 else deep_ratio
            grads += [dict(run, step=0, layer=layer, grad_weight_norm=ratio if layer == 0
                           else 1.0) for layer in range(depth)]
            epochs.append(dict(run, epoch=1, split="test", loss=1.0,
                               accuracy=0.9 if depth == 3 else deep_acc))
            runs.append(run)
    return pd.DataFrame(grads), pd.DataFrame(epochs), pd.DataFrame(runs)


def test_verdict_says_what_the_records_show():
    relu, sigmoid, product = gradlab.tables.verdict(*story_frames())
    assert relu.startswith("relu: the first layer's gradient is kept at every depth")
    assert "2 → 2 at depth 3, 10" in relu and "90% → 90%" in relu
    assert sigmoid.startswith("sigmoid: the first layer's gradient vanishes at depth 10")
    assert "2 → 1e-06" in sigmoid and "90% → 10% (chance)" in sigmoid
    # where sigmoid is trained, a last line says what 0.25^(depth−1) is, and where sigmoid's
    # ratio lies above it (2 at depth 3 > 0.0625)
    assert product.startswith("0.25^(depth−1) (0.062 → 3.8e-06 at depth 3, 10) is the product")
    assert product.endswith("above it for sigmoid at depth 3.")
