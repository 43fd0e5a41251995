"""A run saved by ``gradlab.watch`` on a model of the user's own is read by every command:
``ls``, ``plot`` and ``report`` (it has no depth, activation, seed or epoch rows), and drawn by
layer name."""

import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

import gradlab
from gradlab.cli import cli


def test_plot_and_report_read_a_watched_run(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    with gradlab.watch(model, optimizer, log_every=1) as rec:
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    rec.save(tmp_path, name="mine", config={"lr": 0.1})
    runner = CliRunner()
    listed = runner.invoke(cli, ["ls", str(tmp_path)])
    assert listed.exit_code == 0 and "mine" in listed.output, listed.output
    drawn = runner.invoke(cli, ["plot", str(tmp_path)])
    assert drawn.exit_code == 0, drawn.output
    # figures by layer name; none that assumes gradlab's MLP (a depth, a sigmoid)
    drawn = {p.name for p in (tmp_path / "figures").iterdir()}
    assert {"layer_profile.png", "grad_norm_over_steps.png"} <= drawn, drawn
    assert not drawn & {"vanishing_ratio.png", "grad_norm_by_layer.png"}, drawn
    report = runner.invoke(cli, ["report", str(tmp_path)])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "report.html").read_text()
    assert "mine" in page and "Traceback" not in page
    assert "Vanishing ratio" not in page and "0.25^" not in page and "max σ′" not in page
