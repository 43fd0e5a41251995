"""The figure API by setup: ``hue="activation"`` over runs that differ in another setting (two
inits) draws one line per setup, as ``gradlab plot`` does, instead of pooling the inits into
one line whose band would be their difference shown as seed noise."""

import matplotlib

matplotlib.use("Agg")

from gradlab import plots  # noqa: E402

from .plot_cases import make_results  # noqa: E402

SETUPS = [{"activation": "relu", "init": "default"},
          {"activation": "relu", "init": "kaiming_normal"},
          {"activation": "sigmoid", "init": "default"}]


def legend_labels(figure) -> list[str]:
    from matplotlib.legend import Legend

    while getattr(figure, "figure", figure) is not figure:  # (a subfigure: its root figure)
        figure = figure.figure
    return [t.get_text() for legend in figure.findobj(Legend) for t in legend.get_texts()]


def test_two_inits_are_two_lines_in_every_figure_given_hue_activation():
    results = make_results(SETUPS)
    figures = [plots.grad_norm_by_layer(results.grads), plots.act_grad_by_layer(results.grads),
               plots.accuracy_by_epoch(results.epochs),
               plots.vanishing_ratio(results.grads).figure]
    for figure in figures:
        labels = legend_labels(figure)
        assert any("init=kaiming_normal" in label for label in labels), labels
        assert any("relu, init=default" in label for label in labels), labels
    over_steps = plots.grad_norm_over_steps(results.grads)
    assert len(over_steps.axes) == 3 * 2  # a row of panels per setup (not per activation: 2)


def test_runs_that_differ_only_in_activation_keep_hue_activation():
    results = make_results([{"activation": "relu"}, {"activation": "sigmoid"}])
    labels = legend_labels(plots.grad_norm_by_layer(results.grads))
    assert "relu" in labels and "sigmoid" in labels and not any("," in t for t in labels)


def test_vanishing_ratio_on_a_users_5x4_axes_keeps_its_labels_inside():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    ax = fig.add_subplot()
    plots.vanishing_ratio(make_results(SETUPS[:1] + SETUPS[2:]).grads, ax=ax)
    FigureCanvasAgg(fig).draw()
    box = fig.bbox
    for text in (ax.yaxis.label, ax.xaxis.label, ax.title):
        extent = text.get_window_extent()
        assert extent.x0 >= -0.5 and extent.x1 <= box.x1 + 0.5, (text.get_text(), extent)
        assert extent.y0 >= -0.5 and extent.y1 <= box.y1 + 0.5, (text.get_text(), extent)
