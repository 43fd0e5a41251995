"""Issue 28's measurement: the step-0 per-layer factor ‖∂L/∂z_l‖² / ‖∂L/∂z_{l+1}‖² of a deep tanh
MLP (depth 20, width 256, σ_b² = 0.05), from gradlab's own recorded ``grad_output_norm`` of a
``gradlab.train`` run on one batch of 512, within 5 % of the mean-field χ₁ (gradlab.theory), at
q* and layer by layer from the input. Synthetic data (tests/conftest.py) in the fast tier, real
MNIST in the slow one."""

import math

import numpy as np
import pytest

from gradlab import theory
from gradlab.config import make_config
from gradlab.data import Data, Split
from gradlab.train import train

from .conftest import REAL_DATA, has_real_mnist, make_tiny_data

DEPTH, WIDTH, SB2 = 20, 256, 0.05
MIDDLE = slice(2, DEPTH - 3)  # the factors of layers 2 … 16: away from the input and the loss


def measured_and_predicted(data: Data, init: str, bias_init: str, seed: int = 0):
    """(measured, per-layer prediction, χ₁ at q*): geometric means over the middle layers."""
    config = make_config(depth=DEPTH, width=WIDTH, activation="tanh", init=init,
                         bias_init=bias_init, train_size=len(data.train), batch_size=512,
                         epochs=1, seed=seed)
    result = train(config, data=data, device="cpu")
    assert result.status == "complete"
    rows = result.grads[result.grads["step"] == 0].sort_values("layer")
    norms = rows["grad_output_norm"].to_numpy(float)
    assert len(norms) == DEPTH
    factors = norms[:-1] ** 2 / norms[1:] ** 2
    sw2, sb2 = theory.init_variances(config.init, config.bias_init, config.layer_sizes, "tanh")
    second_moment = float((data.train.x.double() ** 2).mean())
    chi = theory.per_layer("tanh", sw2, sb2, second_moment, DEPTH).chi
    at_q_star = theory.mean_field("tanh", sw2[1], sb2[1]).chi1
    return _geomean(factors[MIDDLE]), _geomean(chi[MIDDLE]), at_q_star


def _geomean(values) -> float:
    return math.exp(np.log(np.asarray(values)).mean())


def one_batch(data: Data) -> Data:
    """The first 512 training examples as the one batch; a small test split (evaluation only)."""
    return Data(train=Split(data.train.x[:512], data.train.y[:512]),
                test=Split(data.test.x[:128], data.test.y[:128]))


BIAS = f"normal:{math.sqrt(SB2)!r}"


@pytest.mark.parametrize("sw2", [1.0, 2.0, 3.0])
def test_per_layer_factor_matches_chi1_synthetic(sw2):
    data = one_batch(make_tiny_data(n_train=512, n_test=128))
    measured, layerwise, at_q_star = measured_and_predicted(data, f"normal_fan_in:{sw2}", BIAS)
    assert measured == pytest.approx(layerwise, rel=0.05)
    assert measured == pytest.approx(at_q_star, rel=0.05)
    # and the three σ_w² lie on the side of 1 the theory puts them: ordered, chaotic
    assert (measured < 1) == (at_q_star < 1)


def test_pytorch_default_init_fits_the_theory_too():
    # U(±1/√fan_in) weights and biases: σ_w² = 1/3, σ_b² = 1/(3·256) (theory.init_variances);
    # deep in the ordered phase, χ₁ ≈ 0.33
    data = one_batch(make_tiny_data(n_train=512, n_test=128))
    measured, layerwise, at_q_star = measured_and_predicted(data, "default", "default")
    assert measured == pytest.approx(layerwise, rel=0.05)
    assert at_q_star == pytest.approx(0.332, abs=0.002)


@pytest.mark.slow
@pytest.mark.skipif(not has_real_mnist(), reason=f"no MNIST under {REAL_DATA}")
@pytest.mark.parametrize("sw2, chi1", [(1.0, 0.759), (1.5, 0.939), (2.0, 1.048), (3.0, 1.209)])
def test_per_layer_factor_matches_chi1_mnist(sw2, chi1):
    from gradlab.data import load_data

    data = one_batch(load_data("mnist", REAL_DATA, train_size=512))
    measured, layerwise, at_q_star = measured_and_predicted(data, f"normal_fan_in:{sw2}", BIAS)
    assert at_q_star == pytest.approx(chi1, abs=6e-4)  # the table
    assert measured == pytest.approx(layerwise, rel=0.05)
    assert measured == pytest.approx(at_q_star, rel=0.05)
