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
