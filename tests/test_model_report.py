"""The report and figures of a model of the user's own (issue 26): layers by name in forward
order, the per-layer gradient and update-ratio picture as the headline, f′ only where the
activation is known and against that activation's own largest f′, logged metrics and the
gradient through time drawn, the user's config whole; and nothing drawn as if the model were a
sigmoid MLP (no depth axis, no 0.25 line)."""

import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab import plots
from gradlab.activations import ACTIVATIONS
from gradlab.cli import cli
from gradlab.plots.catalog import prepare
from gradlab.plots.layout import tidy_log_axes
from gradlab.plots.model import act_grad_by_name, metrics_over_steps

from .plot_cases import make_results

FORWARD = ["zgru", "fc", "head"]  # forward order, which is not the names' alphabetical order


class TextGRU(nn.Module):
    """embedding → GRU → Linear → tanh → Linear, as the issue's user built it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.zgru = nn.GRU(8, 12, batch_first=True)
        self.fc = nn.Linear(12, 10)
        self.head = nn.Linear(10, 4)

    def forward(self, tokens):
        seq, _ = self.zgru(self.embed(tokens))
        return self.head(torch.tanh(self.fc(seq[:, -1])))


def watched_gru(out, name="gru", steps=6):
    torch.manual_seed(0)
    model = TextGRU()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randint(0, 30, (16, 5)), torch.randint(0, 4, (16,))
    accuracies = []
    with gradlab.watch(model, opt, log_every=1, modules=(nn.GRU, nn.Linear),
                       activations={"fc": "tanh"}) as rec:
        for step in range(steps):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.log(loss=loss.item())
            if step % 2 == 1:
                accuracies.append((model(x).argmax(1) == y).float().mean().item())
                rec.log(split="test", accuracy=accuracies[-1])
    rec.save(out, name=name, config={"model": "TextGRU", "batch": 16, "sched": "none"})
    return accuracies


@pytest.fixture(scope="module")
def gru_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("model_report") / "res"
    accuracies = watched_gru(out)
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    return out, accuracies


def test_the_report_of_a_watched_gru_is_drawn_by_layer_name(gru_folder):
    out, _ = gru_folder
    page = (out / "report.html").read_text()
    # the headline is the per-layer gradient and update-ratio picture
    assert "<figure id='layer_profile' class='headline'>" in page
    for figure in ("grad_norm_over_steps", "update_ratio_over_steps", "act_grad_by_layer",
                   "metrics_over_steps", "grad_through_time"):
        assert f"<figure id='{figure}'" in page, figure
    # nothing of gradlab's sigmoid MLP
    for text in ("Vanishing ratio", "0.25^", "max σ′", "depth (Linear", "vanishing_ratio"):
        assert text not in page, text
    # the layers by name, with their type and the activation known after them
    assert "<td>zgru</td><td>GRU</td><td>—</td>" in page
    assert "<td>fc</td><td>Linear</td><td>tanh</td>" in page
    # the user's config, whole (a key named model included), and the logged metrics
    for text in ("<td>model</td><td>TextGRU</td>", "<td>batch</td><td>16</td>",
                 "<td>sched</td><td>none</td>", "test accuracy", "train loss"):
        assert text in page, text
    assert "first/last" in page and "Traceback" not in page


def test_the_layers_keep_their_forward_order(gru_folder):
    out, _ = gru_folder
    data = prepare(gradlab.load(out), out)
    assert data.kind == "model"
    fig = plots.draw("grad_norm_over_steps", data)
    texts = [t.get_text() for sub in fig.subfigs for lg in sub.legends for t in lg.get_texts()]
    assert texts == FORWARD, texts
    profile = plots.draw("layer_profile", data)
    labels = [t.get_text() for t in profile.axes[0].get_xticklabels()]
    assert labels == FORWARD, labels


def reference_lines(fig: Figure) -> list[float]:
    """The y of every dashed horizontal line drawn on the figure's axes."""
    return sorted({round(float(line.get_ydata()[0]), 6) for ax in fig.axes
                   for line in ax.get_lines()
                   if line.get_linestyle() in ("--", ":", "-.") and len(set(
                       np.asarray(line.get_ydata(), float))) == 1})


def test_f_prime_is_drawn_against_its_own_activation(gru_folder):
    out, _ = gru_folder
    data = prepare(gradlab.load(out), out)
    fig = act_grad_by_name(data.grads)
    assert reference_lines(fig) == [ACTIVATIONS["tanh"].max_derivative]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["fc (tanh)"], labels  # layers without a known activation are left out
    # gradlab's own MLPs: each activation's own largest f′, not σ′'s for every one
    tanh = plots.act_grad_by_layer(make_results([{"activation": "tanh"}]).grads)
    assert reference_lines(tanh) == [1.0]
    both = plots.act_grad_by_layer(make_results([{"activation": "tanh"},
                                                 {"activation": "sigmoid"}]).grads)
    assert reference_lines(both) == [0.25, 1.0]
    names = [t.get_text() for sub in both.subfigs for lg in sub.legends
             for t in lg.get_texts()]
    assert "max σ′ = 0.25" in names and "max f′ of tanh = 1" in names, names


def test_the_logged_metrics_are_drawn(gru_folder):
    out, accuracies = gru_folder
    metrics = gradlab.load(out).metrics
    fig = metrics_over_steps(metrics)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert set(panels) == {"accuracy", "loss"}, set(panels)
    drawn = panels["accuracy"].get_lines()[0].get_ydata()
    np.testing.assert_allclose(drawn, accuracies, rtol=1e-6)


@pytest.mark.parametrize("low, high", [(0.13, 0.45), (3e-3, 3e-2), (0.9, 1.1), (2e-5, 8e-3)])
def test_every_log_axis_has_readable_ticks(low, high):
    fig = Figure(figsize=(3, 2))
    ax = fig.add_subplot()
    ax.set_yscale("log")
    ax.plot([0, 1], [low, high])
    ax.set_ylim(low, high)
    tidy_log_axes(fig)
    FigureCanvasAgg(fig).draw()
    shown = [t for t, v in zip(ax.get_yticklabels(), ax.get_yticks())
             if low <= v <= high and t.get_text()]
    assert len(shown) >= 2, [t.get_text() for t in ax.get_yticklabels()]


def test_a_folder_that_mixes_gradlab_runs_and_a_watched_model(one_run, tmp_path):
    out = tmp_path / "res"
    shutil.copytree(one_run, out)
    watched_gru(out, name="mine", steps=2)
    result = CliRunner().invoke(cli, ["report", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    assert "mine" in page and "Vanishing ratio" not in page and "Traceback" not in page
    drawn = CliRunner().invoke(cli, ["plot", str(out), "--only", "vanishing_ratio"])
    assert drawn.exit_code == 0 and "drawn for gradlab's own MLPs only" in drawn.output, \
        drawn.output


def test_mlp_reports_keep_their_figures(one_run, tmp_path):
    out = tmp_path / "res"
    shutil.copytree(one_run, out)
    data = prepare(gradlab.load(out), out)
    assert data.kind == "mlp" and data.names == plots.FIGURES
    assert not math.isnan(float(data.ratios["vanishing_ratio"].iloc[0]))
