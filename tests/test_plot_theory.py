"""gradlab.plots.theory: the measured per-layer factor against autograd, the mean-field line beside
it where the theory fits the run, and "theory does not apply" where it does not."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from gradlab import theory
from gradlab.config import make_config
from gradlab.data import Data, Split
from gradlab.models import linear_layers
from gradlab.plots.theory import NO_CONFIG, chi_by_layer, chi_table
from gradlab.tables import run_info
from gradlab.train import seeded_model, train

from .conftest import make_tiny_data

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def tiny_runs():
    """Two tanh runs (σ_w² 1.0 and 3.0) and one of PyTorch's default init, depth 8, width 128,
    one step on one batch of 256; their grads frames joined with their configs."""
    data = make_tiny_data(n_train=256, n_test=64)
    frames, configs = [], []
    for init, bias in (("normal_fan_in:1.0", "normal:0.2"), ("normal_fan_in:3.0", "normal:0.2"),
                       ("default", "default")):
        config = make_config(depth=8, width=128, activation="tanh", init=init, bias_init=bias,
                             batch_size=256, epochs=1, train_size=256)
        result = train(config, data=data, device="cpu")
        frames.append(result.grads.assign(**{k: v for k, v in config.to_dict().items()
                                             if k != "widths"},
                                          widths=",".join(map(str, config.widths)),
                                          run_id=config.run_id()))
        configs.append(config)
    return data, configs, pd.concat(frames, ignore_index=True)


def test_measured_factor_is_autograds(tiny_runs):
    data, configs, grads = tiny_runs
    table = chi_table(grads)
    for config in configs:
        # the same model and batch (all 256 rows; the mean loss does not depend on their order)
        model = seeded_model(config, torch.device("cpu"))
        outputs = []

        def keep(module, inputs, output, outputs=outputs):
            output.retain_grad()
            outputs.append(output)

        for layer in linear_layers(model):
            layer.register_forward_hook(keep)
        F.cross_entropy(model(data.train.x), data.train.y).backward()
        norms = np.array([o.grad.double().norm().item() for o in outputs])
        expected = norms[:-1] ** 2 / norms[1:] ** 2
        rows = table[table["run_id"] == config.run_id()].sort_values("layer")
        np.testing.assert_allclose(rows["measured"], expected, rtol=1e-4)


def test_prediction_is_the_theorys_and_says_where_it_fits(tiny_runs):
    data, configs, grads = tiny_runs
    m2 = float((data.train.x.double() ** 2).mean())
    table = chi_table(grads, input_second_moment=m2)
    for config in configs:
        rows = table[table["run_id"] == config.run_id()].sort_values("layer")
        sw2, sb2 = theory.init_variances(config.init, config.bias_init, config.layer_sizes,
                                         "tanh")
        np.testing.assert_allclose(rows["predicted"],
                                   theory.per_layer("tanh", sw2, sb2, m2, 8).chi)
        assert rows["chi1"].iloc[0] == pytest.approx(theory.mean_field("tanh", sw2[1],
                                                                       sb2[1]).chi1)
        # the middle layers' measured factor near the prediction (width 128: within 10 %)
        middle = rows.iloc[2:-2]
        ratio = math.exp(np.log(middle["measured"] / middle["predicted"]).mean())
        assert ratio == pytest.approx(1, abs=0.1)
    # without the input's second moment: no layer-wise line, χ₁ at q* still
    plain = chi_table(grads)
    assert plain["predicted"].isna().all() and plain["chi1"].notna().all()


def test_a_model_of_ones_own_gets_no_number(tiny_runs):
    _, _, grads = tiny_runs
    bare = grads[["run_id", "step", "layer", "grad_output_norm"]]
    table = chi_table(bare, input_second_moment=0.1)
    assert table["predicted"].isna().all() and table["chi1"].isna().all()
    assert (table["note"] == NO_CONFIG).all()
    ax = chi_by_layer(bare, input_second_moment=0.1)
    assert "theory does not apply" in ax.get_title()
    assert not [line for line in ax.get_lines() if line.get_linestyle() == "--"]


def test_chi_by_layer_draws_measurement_and_theory(tiny_runs, tmp_path):
    data, configs, grads = tiny_runs
    m2 = float((data.train.x.double() ** 2).mean())
    ax = chi_by_layer(grads, input_second_moment=m2)
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == len(configs)  # one χ^(l) line per setup
    for line in dashed:
        assert len(line.get_xdata()) == 7  # layers 0 … depth−2
    assert "theory does not apply" not in ax.get_title()
    ax.get_figure(root=True).savefig(tmp_path / "chi.png")
    assert (tmp_path / "chi.png").stat().st_size > 1000
    assert len(run_info(grads)) == 3


def test_no_records_at_the_step_is_a_one_line_error(tiny_runs):
    _, _, grads = tiny_runs
    with pytest.raises(ValueError, match="no records at step 99"):
        chi_table(grads, step=99)


def test_data_of_one_batch_is_what_train_saw():
    # guard for the autograd test above: one batch is the whole training split
    data = Data(train=Split(torch.zeros(4, 784), torch.zeros(4, dtype=torch.long)),
                test=Split(torch.zeros(2, 784), torch.zeros(2, dtype=torch.long)))
    config = make_config(depth=2, width=4, batch_size=4, epochs=1, train_size=4)
    assert train(config, data=data, device="cpu").steps == 1


def grid_runs(sw2s=(1.0, 2.0, 4.0), depths=(6, 24)):
    """A runs frame of a trainability grid, each accuracy a known function of its cell."""
    rows = []
    for i, s in enumerate(sw2s):
        for j, d in enumerate(depths):
            rows.append({"run_id": f"r{i}{j}", "activation": "tanh", "depth": d,
                         "widths": ",".join(["128"] * (d - 1)),
                         "init": f"normal_fan_in:{s!r}", "bias_init": "normal:0.2",
                         "final_test_accuracy": 0.1 + 0.1 * i + 0.01 * j})
    return pd.DataFrame(rows)


def test_trainability_heatmap_cells_and_six_xi_c_curve():
    from gradlab.plots.theory import trainability

    ax = trainability(grid_runs(), multiple=6.0)
    (mesh,) = [c for c in ax.collections if hasattr(c, "get_array") and c.get_array() is not None]
    values = np.asarray(mesh.get_array()).reshape(2, 3)  # rows: depth, columns: σ_w²
    expected = np.array([[10 + 10 * i + j for i in range(3)] for j in range(2)])
    np.testing.assert_allclose(values, expected)
    (curve,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    for x, y in list(zip(curve.get_xdata(), curve.get_ydata()))[::13]:
        xi = theory.mean_field("tanh", x, 0.2**2).xi_c  # drawn at log2(depth), as the cells
        assert y == pytest.approx(math.log2(6 * xi)) or (xi is None and np.isnan(y))


def test_trainability_refuses_mixed_or_unknown_runs():
    from gradlab.plots.theory import trainability

    mixed = grid_runs()
    mixed.loc[0, "activation"] = "relu"
    with pytest.raises(ValueError, match="one activation and one σ_b²"):
        trainability(mixed)
    with pytest.raises(ValueError, match="no column 'init'"):
        trainability(grid_runs().drop(columns="init"))
