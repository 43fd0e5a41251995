"""gradlab.theory against closed forms (ReLU, leaky ReLU, erf, small q), Monte-Carlo estimates
(tanh, sigmoid, GELU, SiLU, ELU, softsign), a simulated wide net (numpy), the measured weight
variances of gradlab's inits, and issue 28's table of χ₁ for tanh."""

import math

import numpy as np
import pytest
import torch

from gradlab import theory
from gradlab.activations import ACTIVATIONS, LEAKY_SLOPE
from gradlab.models import build_mlp, linear_layers

SMOOTH = ["tanh", "sigmoid", "gelu", "silu", "elu", "softsign"]


def monte_carlo(values: np.ndarray) -> tuple[float, float]:
    """Sample mean and its standard error."""
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


@pytest.fixture(scope="module")
def normals():
    return np.random.default_rng(0).standard_normal((2, 400_000))


def test_every_registry_activation_has_numpy_functions_equal_to_torchs():
    assert set(theory.FUNCTIONS) == set(ACTIVATIONS)
    assert theory.LEAKY_SLOPE == LEAKY_SLOPE
    z = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    for name, act in ACTIVATIONS.items():
        phi, dphi = theory.FUNCTIONS[name]
        np.testing.assert_allclose(phi(z.numpy()), act.module()(z).numpy(), atol=1e-12)
        np.testing.assert_allclose(dphi(z.numpy()), act.derivative(z).numpy(), atol=1e-12)


# --- closed forms ---------------------------------------------------------------------------

@pytest.mark.parametrize("sw2, sb2", [(0.5, 0.1), (1.0, 0.05), (1.9, 0.3), (1.5, 0.0)])
def test_relu_closed_forms(sw2, sb2):
    # V(q) = σ_w² q/2 + σ_b²: q* = σ_b² / (1 − σ_w²/2); χ₁ = V′ = σ_w²/2 at every q
    m = theory.mean_field("relu", sw2, sb2)
    assert m.q_star == pytest.approx(sb2 / (1 - sw2 / 2), rel=1e-9, abs=1e-12)
    assert m.chi1 == pytest.approx(sw2 / 2, rel=1e-12)
    assert m.xi_c == pytest.approx(-1 / math.log(sw2 / 2), rel=1e-9)
    assert m.xi_q == pytest.approx(-1 / math.log(sw2 / 2), rel=1e-6)
    assert m.c_star == 1.0 and m.phase == "ordered" and not m.notes
    for q in (0.01, 1.0, 50.0):
        assert theory.variance_map("relu", sw2, sb2, q) == pytest.approx(sw2 * q / 2 + sb2)


def test_leaky_relu_closed_forms():
    a2 = LEAKY_SLOPE**2
    m = theory.mean_field("leaky_relu", 1.2, 0.1)
    assert m.chi1 == pytest.approx(1.2 * (1 + a2) / 2, rel=1e-12)
    assert m.q_star == pytest.approx(0.1 / (1 - 1.2 * (1 + a2) / 2), rel=1e-9)


def test_relu_at_and_beyond_the_boundary_says_so_not_a_number():
    critical = theory.mean_field("relu", 2.0, 0.0)  # V(q) = q: every q is a fixed point
    assert critical.chi1 == pytest.approx(1.0, abs=1e-12) and critical.phase == "critical"
    assert critical.xi_c == math.inf and critical.xi_q == math.inf
    assert any("critical line" in n for n in critical.notes)
    assert any("every q is marginal" in n for n in critical.notes)
    for sw2, sb2 in ((2.0, 0.05), (2.5, 0.0), (3.0, 0.1)):  # q grows without bound
        m = theory.mean_field("relu", sw2, sb2)
        assert m.q_star is None and m.xi_q is None and m.xi_c is None and m.c_star is None
        assert m.chi1 == pytest.approx(sw2 / 2)  # still true: φ′ does not depend on q
        assert any("no fixed point" in n or "did not settle" in n for n in m.notes)


def test_tanh_at_its_critical_point_gives_no_q_star():
    m = theory.mean_field("tanh", 1.0, 0.0)  # q → 0 as 1/(2l): no geometric approach
    assert m.q_star is None and m.chi1 is None and m.phase == "unknown"
    assert any("did not settle" in n for n in m.notes)


@pytest.mark.parametrize("name, slope0", [("tanh", 1.0), ("softsign", 1.0), ("gelu", 0.5),
                                          ("silu", 0.5), ("elu", 1.0)])
def test_small_q_limit_is_sw2_times_phi_prime_at_zero_squared(name, slope0):
    # σ_b² = 0, σ_w² φ′(0)² < 1 and φ(0) = 0: q* = 0 and χ₁ = σ_w² φ′(0)²
    sw2 = 0.5
    m = theory.mean_field(name, sw2, 0.0)
    assert m.q_star < 1e-10
    assert m.chi1 == pytest.approx(sw2 * slope0**2, rel=1e-6)


@pytest.mark.parametrize("a, b", [(0.3, 0.3), (1.0, 2.0), (2.5, 0.7)])
def test_quadrature_against_erf_closed_form(a, b):
    # E[erf(a u) erf(b u)] = (2/π) arcsin(2ab / √((1+2a²)(1+2b²))) (Williams 1997)
    erf = theory._erf
    exact = 2 / math.pi * math.asin(2 * a * b / math.sqrt((1 + 2 * a * a) * (1 + 2 * b * b)))
    assert theory.gaussian_mean(lambda z: erf(a * z) * erf(b * z), 1.0) == pytest.approx(
        exact, abs=1e-8)


@pytest.mark.parametrize("c", [-0.5, 0.0, 0.4, 0.9, 0.999])
def test_relu_correlation_map_against_the_arc_cosine_kernel(c):
    # Cho & Saul (2009): E[relu(u₁) relu(u₂)] = q (√(1−c²) + (π − arccos c) c) / (2π), and
    # E[relu′(u₁) relu′(u₂)] = (π − arccos c) / (2π): the kinks of the integrands lie on the
    # polar rule's panel edges, so it is exact to rounding
    q, sw2, sb2 = 1.3, 1.7, 0.2
    exact = (sw2 * (math.sqrt(1 - c * c) + (math.pi - math.acos(c)) * c) / (2 * math.pi)
             + sb2 / q)
    assert theory.correlation_map("relu", sw2, sb2, q, c) == pytest.approx(exact, abs=1e-12)
    assert theory.chi_c("relu", sw2, q, c) == pytest.approx(
        sw2 * (math.pi - math.acos(c)) / (2 * math.pi), abs=1e-12)


# --- Monte-Carlo ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("q", [0.2, 1.0, 4.0])
def test_variance_map_chi_and_slope_against_monte_carlo(name, q, normals):
    phi, dphi = theory.FUNCTIONS[name]
    u = math.sqrt(q) * normals[0]
    sw2, sb2 = 1.7, 0.05
    mean, se = monte_carlo(sw2 * phi(u) ** 2 + sb2)
    assert abs(theory.variance_map(name, sw2, sb2, q) - mean) < 5 * se
    mean, se = monte_carlo(sw2 * dphi(u) ** 2)
    assert abs(theory.chi(name, sw2, q) - mean) < 5 * se
    # V′(q) against a central difference of V itself
    h = 1e-5 * q
    numeric = (theory.variance_map(name, sw2, sb2, q + h)
               - theory.variance_map(name, sw2, sb2, q - h)) / (2 * h)
    assert theory.variance_slope(name, sw2, q) == pytest.approx(numeric, rel=1e-5)


def test_tanh_slope_is_schoenholz_form():
    # ξ_q⁻¹ = −ln(χ₁ + σ_w² E[φ″ φ]) at q* (Schoenholz et al. 2017, eq. 6), φ″ = −2 tanh (1 − tanh²)
    m = theory.mean_field("tanh", 1.5, 0.05)
    extra = theory.gaussian_mean(lambda z: -2 * np.tanh(z) ** 2 * (1 - np.tanh(z) ** 2),
                                 m.q_star)
    assert m.xi_q == pytest.approx(-1 / math.log(m.chi1 + 1.5 * extra), rel=1e-9)


@pytest.mark.parametrize("name, sw2, sb2", [("tanh", 1.5, 0.05), ("sigmoid", 4.0, 0.1),
                                            ("gelu", 1.8, 0.2), ("softsign", 2.0, 0.05)])
def test_q_star_is_a_fixed_point_by_monte_carlo(name, sw2, sb2, normals):
    m = theory.mean_field(name, sw2, sb2)
    phi, _ = theory.FUNCTIONS[name]
    mean, se = monte_carlo(sw2 * phi(math.sqrt(m.q_star) * normals[0]) ** 2 + sb2)
    assert abs(mean - m.q_star) < 5 * se
    # and the same fixed point from another start
    assert theory.fixed_point(name, sw2, sb2, q0=10.0).q == pytest.approx(m.q_star, rel=1e-9)


@pytest.mark.parametrize("name, sw2", [("tanh", 2.0), ("tanh", 3.0), ("tanh", 4.0),
                                        ("softsign", 5.0), ("elu", 1.9)])
def test_chaotic_c_star_and_chi_c_by_monte_carlo(name, sw2, normals):
    sb2 = 0.05
    m = theory.mean_field(name, sw2, sb2)
    assert m.phase == "chaotic" and 0 <= m.c_star < 1 and m.chi_c < 1 < m.chi1
    phi, dphi = theory.FUNCTIONS[name]
    s, c = math.sqrt(m.q_star), m.c_star
    u1, u2 = s * normals[0], s * (c * normals[0] + math.sqrt(1 - c * c) * normals[1])
    mean, se = monte_carlo((sw2 * phi(u1) * phi(u2) + sb2) / m.q_star)
    assert abs(mean - c) < 5 * se  # c* is the correlation map's fixed point
    mean, se = monte_carlo(sw2 * dphi(u1) * dphi(u2))
    assert abs(mean - m.chi_c) < 5 * se
    assert m.xi_c == pytest.approx(-1 / math.log(m.chi_c))


def test_odd_activation_without_bias_has_c_star_zero():
    m = theory.mean_field("tanh", 2.0, 0.0)
    eprime = theory.gaussian_mean(theory.FUNCTIONS["tanh"][1], m.q_star)
    assert m.c_star == 0.0 and m.chi_c == pytest.approx(2.0 * eprime**2, rel=1e-9)


# --- issue 28's table; the ordered and chaotic phases ----------------------------------------

@pytest.mark.parametrize("sw2, expected", [(1.0, 0.759), (1.5, 0.939), (2.0, 1.048),
                                           (3.0, 1.209)])
def test_issue_table_tanh(sw2, expected):
    assert theory.mean_field("tanh", sw2, 0.05).chi1 == pytest.approx(expected, abs=6e-4)


def test_xi_c_peaks_at_the_critical_line():
    # tanh, σ_b² = 0.05: χ₁ crosses 1 between σ_w² = 1.5 and 2 (the table above); ξ_c grows
    # towards the crossing from either side (Schoenholz et al. 2017, Fig. 1)
    sw2s = [1.0, 1.3, 1.6, 1.9, 2.5, 3.5]
    xis = [theory.mean_field("tanh", s, 0.05).xi_c for s in sw2s]
    assert xis[0] < xis[1] < xis[2] and xis[3] > xis[4] > xis[5]
    assert min(xis[2], xis[3]) > 10 > xis[0]


# --- a finite net, layer by layer -------------------------------------------------------------

def test_per_layer_starts_from_the_input_and_tends_to_q_star():
    m = theory.mean_field("tanh", 1.5, 0.05)
    pred = theory.per_layer("tanh", 1.5, 0.05, input_second_moment=0.1, depth=40)
    assert pred.q[0] == pytest.approx(1.5 * 0.1 + 0.05)
    assert pred.q[-1] == pytest.approx(m.q_star, rel=1e-6)
    assert pred.chi[-1] == pytest.approx(m.chi1, rel=1e-6)
    assert len(pred.q) == 40 and len(pred.chi) == 39
    at_q_star = theory.per_layer("tanh", 1.5, 0.05, (m.q_star - 0.05) / 1.5, depth=5)
    np.testing.assert_allclose(at_q_star.chi, m.chi1, rtol=1e-9)


def test_per_layer_relu_closed_form_with_layer_wise_sw2():
    sw2 = [1.0, 1.5, 0.5, 2.0]
    pred = theory.per_layer("relu", sw2, 0.0, input_second_moment=2.0, depth=4)
    np.testing.assert_allclose(pred.q, [2.0, 1.5, 0.375, 0.375])  # q ← σ_w² q / 2
    np.testing.assert_allclose(pred.chi, [0.75, 0.25, 1.0])  # σ_w²(l+1) / 2


def test_per_layer_against_a_simulated_wide_net():
    # a numpy net of width 2000: the measured mean z² of each layer and the squared-norm ratio
    # of a back-propagated random signal, against q^l and χ^l
    rng = np.random.default_rng(1)
    sw2, sb2, width, depth = 2.0, 0.05, 2000, 6
    x = rng.random((64, 300))
    pred = theory.per_layer("tanh", sw2, sb2, float((x * x).mean()), depth)
    weights = [rng.standard_normal((width, 300 if i == 0 else width)) * math.sqrt(
        sw2 / (300 if i == 0 else width)) for i in range(depth)]
    h, zs = x, []
    for i, w in enumerate(weights):
        z = h @ w.T + rng.standard_normal(width) * math.sqrt(sb2)
        zs.append(z)
        h = np.tanh(z)
        assert (z * z).mean() == pytest.approx(pred.q[i], rel=0.05)
    delta = rng.standard_normal(zs[-1].shape)
    for i in range(depth - 2, -1, -1):
        before = (delta * delta).sum()
        delta = (delta @ weights[i + 1]) * (1 - np.tanh(zs[i]) ** 2)
        assert (delta * delta).sum() / before == pytest.approx(pred.chi[i], rel=0.05)


# --- gradlab's inits ----------------------------------------------------------------------------

@pytest.mark.parametrize("init, bias_init, activation", [
    ("default", "default", "tanh"), ("normal_fan_in:1.7", "normal:0.3", "tanh"),
    ("kaiming_normal", "zeros", "relu"), ("kaiming_uniform", "zeros", "leaky_relu"),
    ("xavier_uniform", "zeros", "tanh"), ("xavier_normal", "zeros", "tanh"),
    ("lecun_normal", "zeros", "tanh"), ("orthogonal:1.3", "zeros", "tanh"),
    ("normal:0.05", "zeros", "tanh"), ("uniform:0.07", "zeros", "tanh"),
])
def test_init_variances_against_measured_weights(init, bias_init, activation):
    sizes = (784, 600, 900, 10)  # a wide layer, a tall layer and the classifier
    sw2, sb2 = theory.init_variances(init, bias_init, sizes, activation)
    torch.manual_seed(0)
    for i, layer in enumerate(linear_layers(build_mlp(sizes, activation, init, bias_init))):
        w, b = layer.weight.double(), layer.bias.double()
        measured = (w * w).mean().item() * layer.in_features  # zero-mean laws: E W² = Var W
        assert measured == pytest.approx(sw2[i], rel=0.05 if i < 2 else 0.15), i
        if sb2[i] == 0:
            assert (b == 0).all()
        else:
            assert (b * b).mean().item() == pytest.approx(sb2[i], rel=0.3)


def test_theory_does_not_apply_is_said():
    with pytest.raises(theory.TheoryDoesNotApply, match="no hidden layer"):
        theory.init_variances("default", "default", (784, 10), "tanh")
    with pytest.raises(theory.TheoryDoesNotApply, match="init"):
        theory.init_variances("he", "zeros", (784, 8, 10), "tanh")


@pytest.mark.parametrize("call, needle", [
    (lambda: theory.mean_field("swish", 1.0, 0.0), "activation 'swish'"),
    (lambda: theory.mean_field("tanh", 0.0, 0.0), "sw2=0.0 is invalid"),
    (lambda: theory.mean_field("tanh", 1.0, -1.0), "sb2=-1.0 is invalid"),
    (lambda: theory.mean_field("tanh", math.nan, 0.0), "sw2=nan is invalid"),
    (lambda: theory.per_layer("tanh", [1.0, 2.0], 0.0, 1.0, 3), "one per Linear layer"),
    (lambda: theory.per_layer("tanh", 1.0, 0.0, -1.0, 3), "input_second_moment"),
])
def test_bad_input_is_a_one_line_error(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_readme_section_runs_and_its_number_is_true():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Theory beside the measurement", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
    assert "# 0.9386" in code
    assert theory.mean_field("tanh", sw2=1.5, sb2=0.05).chi1 == pytest.approx(0.9386, abs=5e-5)
