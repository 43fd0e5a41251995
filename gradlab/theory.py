"""Mean-field signal propagation in a wide MLP: q*, χ₁, ξ_q, ξ_c and the layer-wise χ₁ of a net.

Poole et al. (2016), "Exponential expressivity in deep neural networks through transient chaos",
and Schoenholz et al. (2017), "Deep Information Propagation": in a wide MLP whose weights have
variance σ_w²/fan_in and biases σ_b², the pre-activation z of a layer is Gaussian with variance
q, and one layer maps it by the variance map

    q ↦ V(q) = σ_w² E[φ(√q u)²] + σ_b²,            u ~ N(0, 1),

towards a fixed point q*. Backwards, ∂L/∂z of a layer has, in expectation, χ = σ_w²(next layer)
× E[φ′(√q u)²] times the squared norm of the next layer's; at q* that is χ₁. The depth scales:
ξ_q = −1/ln V′(q*) (how fast q reaches q*), ξ_c = −1/ln χ_c (how fast two inputs' correlation
reaches its fixed point c*; χ_c = χ₁ in the ordered phase, where c* = 1) and the gradient's
ξ_∇ = −1/ln χ₁. Every expectation is a Gauss quadrature split at the activations' kinks (plain
numpy; see ``NODES``).

Where the theory gives no number, the result holds None and a note says why; at a critical
point a depth scale is ``math.inf``, with a note. The wide-network limit needs only each
layer's weight and bias variances, not their law: ``init_variances`` gives those of every
gradlab init (Gaussian, uniform or orthogonal). How well a finite net follows it is measured,
not assumed (tests/test_theory_measured.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .activations import LEAKY_SLOPE  # (that module imports torch only when asked)

# Gauss–Legendre on [0, RADIUS], mirrored: every registry activation is smooth but at 0 (ReLU's
# kink, ELU's and softsign's φ″), and a rule that splits there converges fast for all of them. A
# plain Gauss–Hermite rule across the kink converges as 1/n: with 100 nodes softsign's
# E[φ′²] at q = 1 is 5 % low, ELU's 0.5 %.
NODES = 96
RADIUS = 12.0  # the normal density beyond 12 is below 1e-31
ANGLES = 24  # Gauss–Legendre nodes per angular panel of the 2-D (polar) rule
MAX_ITERATIONS = 20_000
Q_MAX = 1e12  # beyond this the variance map is taken to have no fixed point above q0
TOLERANCE = 1e-14
CRITICAL = 1e-9  # |slope − 1| below this is the critical line: a depth scale is infinite

_t, _v = np.polynomial.legendre.leggauss(NODES)
_R = (_t + 1) * RADIUS / 2  # nodes on [0, RADIUS]
_HALF = _v * RADIUS / 2 * np.exp(-_R * _R / 2) / math.sqrt(2 * math.pi)  # ∫_0^∞ · φ(u) du
_RADIAL = _v * RADIUS / 2 * _R * np.exp(-_R * _R / 2)  # ∫_0^∞ · r e^{−r²/2} dr
_a, _b = np.polynomial.legendre.leggauss(ANGLES)


def _sigmoid(z):
    return 0.5 * (1 + np.tanh(z / 2))  # no overflow for large |z|


def _erf(z):
    return np.frompyfunc(math.erf, 1, 1)(z).astype(float)


def _gelu(z):
    return z * 0.5 * (1 + _erf(z / math.sqrt(2)))


def _gelu_prime(z):
    return 0.5 * (1 + _erf(z / math.sqrt(2))) + z * np.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _silu_prime(z):
    s = _sigmoid(z)
    return s * (1 + z * (1 - s))


# φ and φ′ of every activation in gradlab.activations (tests hold the two tables to each other)
FUNCTIONS: dict[str, tuple[Callable, Callable]] = {
    "sigmoid": (_sigmoid, lambda z: _sigmoid(z) * (1 - _sigmoid(z))),
    "tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(float)),
    "leaky_relu": (lambda z: np.where(z > 0, z, LEAKY_SLOPE * z),
                   lambda z: np.where(z > 0, 1.0, LEAKY_SLOPE)),
    "elu": (lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0))),
            lambda z: np.where(z > 0, 1.0, np.exp(np.minimum(z, 0)))),
    "gelu": (_gelu, _gelu_prime),
    "silu": (lambda z: z * _sigmoid(z), _silu_prime),
    "softsign": (lambda z: z / (1 + np.abs(z)), lambda z: 1 / (1 + np.abs(z)) ** 2),
}
# φ(a z) = a φ(z) for a > 0: φ′ depends on the sign only, so χ₁ does not depend on q
HOMOGENEOUS = ("relu", "leaky_relu")


def _functions(activation: str) -> tuple[Callable, Callable]:
    try:
        return FUNCTIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation {activation!r} has no mean-field functions: one of "
                         f"{', '.join(FUNCTIONS)}") from None


def gaussian_mean(f: Callable, q: float) -> float:
    """E[f(√q u)] for u ~ N(0, 1): Gauss–Legendre on each half-line (see ``NODES``)."""
    s = math.sqrt(q)
    return float(_HALF @ (f(s * _R) + f(-s * _R)))


def variance_map(activation: str, sw2: float, sb2: float, q: float) -> float:
    """V(q) = σ_w² E[φ(√q u)²] + σ_b²: the next layer's pre-activation variance."""
    phi, _ = _functions(activation)
    return sw2 * gaussian_mean(lambda z: phi(z) ** 2, q) + sb2


def variance_slope(activation: str, sw2: float, q: float) -> float:
    """V′(q) = σ_w² E[φ′(√q u)² + φ(√q u) φ″(√q u)] (Schoenholz et al.'s ξ_q⁻¹ = −ln V′(q*)),
    computed without φ″ as σ_w² E[u φ(√q u) φ′(√q u)] / √q (Stein's lemma)."""
    phi, dphi = _functions(activation)
    if q <= 0:
        return sw2 * float(dphi(np.zeros(1))[0]) ** 2
    s = math.sqrt(q)
    return sw2 * float(_HALF @ (_R * (phi(s * _R) * dphi(s * _R)
                                      - phi(-s * _R) * dphi(-s * _R)))) / s


def chi(activation: str, sw2: float, q: float) -> float:
    """σ_w² E[φ′(√q u)²]: the expected ‖∂L/∂z_l‖² / ‖∂L/∂z_{l+1}‖² where z_l has variance q and
    σ_w² is layer l+1's. At q* this is χ₁."""
    _, dphi = _functions(activation)
    return sw2 * gaussian_mean(lambda z: dphi(z) ** 2, q)


def depth_scale(slope: float | None) -> float | None:
    """−1/ln(slope): the layers over which a deviation shrinks by e; ``math.inf`` on the
    critical line (slope 1); negative where slope > 1 (it grows by e over |ξ| layers)."""
    if slope is None:
        return None
    if abs(slope - 1) < CRITICAL:
        return math.inf
    if slope <= 0:
        return 0.0  # gone in one layer
    return -1 / math.log(slope)


@dataclass(frozen=True)
class FixedPoint:
    """The variance map iterated from ``q0``: ``q`` the fixed point, or None with ``note``."""

    q: float | None
    iterations: int
    note: str = ""


def fixed_point(activation: str, sw2: float, sb2: float, q0: float = 1.0) -> FixedPoint:
    """Iterate q ← V(q) from ``q0`` until a step changes q by less than 1e-14 of max(q, 1).

    None, with a note, where q grows past ``Q_MAX`` (no fixed point above q0: e.g. ReLU with
    σ_w² > 2, or = 2 with σ_b² > 0) or does not settle in ``MAX_ITERATIONS`` (a critical point,
    approached as a power law, not geometrically).
    """
    _check_variances(sw2, sb2)
    q = float(q0)
    for i in range(1, MAX_ITERATIONS + 1):
        new = variance_map(activation, sw2, sb2, q)
        if not math.isfinite(new) or new > Q_MAX:
            return FixedPoint(None, i, f"no fixed point: the variance map grows without bound "
                                       f"from q0={q0:g} (σ_w²={sw2:g}, σ_b²={sb2:g})")
        if abs(new - q) <= TOLERANCE * max(new, 1.0):
            return FixedPoint(new, i)
        q = new
    return FixedPoint(None, MAX_ITERATIONS, f"the variance map did not settle in "
                                            f"{MAX_ITERATIONS} steps from q0={q0:g} (q={q:.4g}, "
                                            f"slope {variance_slope(activation, sw2, q):.6f}): "
                                            f"at or near a critical point")


def correlation_map(activation: str, sw2: float, sb2: float, q: float, c: float) -> float:
    """The next layer's correlation of two inputs whose pre-activations have variance q and
    correlation c: (σ_w² E[φ(u₁)φ(u₂)] + σ_b²) / q, with u₁ = √q z₁, u₂ = √q (c z₁ + √(1−c²) z₂)."""
    phi, _ = _functions(activation)
    u1, u2, weights = _pair(q, c)
    return (sw2 * float(np.sum(weights * phi(u1) * phi(u2))) + sb2) / q


def chi_c(activation: str, sw2: float, q: float, c: float) -> float:
    """χ_c = σ_w² E[φ′(u₁)φ′(u₂)]: the slope of the correlation map at c (u as above)."""
    _, dphi = _functions(activation)
    u1, u2, weights = _pair(q, c)
    return sw2 * float(np.sum(weights * dphi(u1) * dphi(u2)))


def _pair(q: float, c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """u₁, u₂ and the weights of a polar rule for E over (z₁, z₂) ~ N(0, I): Gauss–Legendre in
    r, and in θ on panels split where u₁ or u₂ is 0 (the lines of the activations' kinks)."""
    s, d = math.sqrt(q), math.sqrt(max(1 - c * c, 0.0))
    kinks = np.mod([math.pi / 2, 3 * math.pi / 2, math.atan2(-c, d), math.atan2(-c, d) + math.pi],
                   2 * math.pi)
    edges = np.unique(np.concatenate([[0.0, 2 * math.pi], kinks]))
    lo, hi = edges[:-1, None], edges[1:, None]
    theta = ((lo + hi) / 2 + (hi - lo) / 2 * _a).ravel()
    angular = ((hi - lo) / 2 * _b).ravel() / (2 * math.pi)
    z1 = np.outer(np.cos(theta), _R)
    z2 = np.outer(np.sin(theta), _R)
    return s * z1, s * (c * z1 + d * z2), np.outer(angular, _RADIAL)


def correlation_fixed_point(activation: str, sw2: float, sb2: float, q: float,
                            chi1: float) -> tuple[float | None, str]:
    """c*: 1 in the ordered phase (χ₁ ≤ 1); in the chaotic phase the stable c* < 1, the last
    root of C(c) − c on [0, 1), bracketed on a grid dense towards 1 (1 − c from 1 to 1e-6) and
    bisected. None, with a note, where c* is within 1e-6 of 1 (just above criticality)."""
    if chi1 <= 1 + CRITICAL:
        return 1.0, ""
    grid = 1 - np.geomspace(1.0, 1e-6, 80)
    gap = np.array([correlation_map(activation, sw2, sb2, q, c) - c for c in grid])
    if abs(gap[0]) < 1e-13:  # odd φ, σ_b² = 0: uncorrelated stays uncorrelated
        return 0.0, ""
    above = np.nonzero(gap > 0)[0]
    if len(above) == 0 or above[-1] == len(grid) - 1:
        return None, (f"c* is within 1e-6 of 1 (χ₁ = {chi1:.9f}, just above criticality): "
                      f"not resolved")
    lo, hi = grid[above[-1]], grid[above[-1] + 1]
    for _ in range(45):  # 2^-45 of a bracket: below the quadrature's own error
        mid = (lo + hi) / 2
        if correlation_map(activation, sw2, sb2, q, mid) - mid > 0:
            lo = mid
        else:
            hi = mid
    return float((lo + hi) / 2), ""


@dataclass(frozen=True)
class MeanField:
    """The mean-field quantities of one (activation, σ_w², σ_b²). A value the theory does not
    give is None; ``notes`` say why, and why a depth scale is ``math.inf`` where it is."""

    activation: str
    sw2: float
    sb2: float
    q_star: float | None
    chi1: float | None
    c_star: float | None
    chi_c: float | None
    xi_q: float | None
    xi_c: float | None
    xi_grad: float | None  # −1/ln χ₁; negative: the gradient grows by e over |ξ| layers
    notes: tuple[str, ...] = ()

    @property
    def phase(self) -> str:
        """``ordered`` (χ₁ < 1), ``critical`` (χ₁ = 1), ``chaotic`` (χ₁ > 1) or ``unknown``."""
        if self.chi1 is None:
            return "unknown"
        if abs(self.chi1 - 1) < CRITICAL:
            return "critical"
        return "ordered" if self.chi1 < 1 else "chaotic"


def mean_field(activation: str, sw2: float, sb2: float, q0: float = 1.0) -> MeanField:
    """q*, χ₁, c*, χ_c, ξ_q, ξ_c and ξ_∇ of ``activation`` at σ_w², σ_b² (q* reached from q0).

    Where q* does not exist, χ₁ is still given for ReLU and leaky ReLU (their φ′ does not
    depend on q), and nothing else is.
    """
    _functions(activation)
    point = fixed_point(activation, sw2, sb2, q0)
    notes = [point.note] if point.note else []
    q = point.q
    if q is None:
        chi1 = chi(activation, sw2, 1.0) if activation in HOMOGENEOUS else None
        if chi1 is not None:
            notes.append(f"χ₁ = {chi1:.6g} at every q ({activation} is positively homogeneous)")
        return MeanField(activation, sw2, sb2, None, chi1, None, None, None, None,
                         depth_scale(chi1), tuple(notes))
    chi1 = chi(activation, sw2, q)
    slope = variance_slope(activation, sw2, q)
    c_star, note = correlation_fixed_point(activation, sw2, sb2, q, chi1)
    if note:
        notes.append(note)
    slope_c = None if c_star is None else chi1 if c_star == 1.0 else chi_c(activation, sw2, q,
                                                                          c_star)
    if abs(slope - 1) < CRITICAL:
        notes.append("V′(q*) = 1: every q is marginal, ξ_q is infinite")
    if slope_c is not None and abs(slope_c - 1) < CRITICAL:
        notes.append("χ₁ = 1: the critical line (order to chaos), ξ_c and ξ_∇ are infinite")
    return MeanField(activation, sw2, sb2, q, chi1, c_star, slope_c, depth_scale(slope),
                     depth_scale(slope_c), depth_scale(chi1), tuple(notes))


@dataclass(frozen=True)
class LayerPrediction:
    """A finite net's mean-field sequence from its input: ``q[l]`` the variance of z_l (the
    pre-activation of Linear layer l, l = 0 … depth−1), ``chi[l]`` the expected
    ‖∂L/∂z_l‖² / ‖∂L/∂z_{l+1}‖² (l = 0 … depth−2)."""

    q: np.ndarray
    chi: np.ndarray


def per_layer(activation: str, sw2: float | Sequence[float], sb2: float | Sequence[float],
              input_second_moment: float, depth: int) -> LayerPrediction:
    """The layer-wise q^l and χ^l of a ``depth``-layer net, from q^0 = σ_w²(0) m + σ_b²(0) with
    m = mean(x²) over the input's features and examples (what the first layer sees).

    ``sw2``, ``sb2``: one value, or one per Linear layer (``init_variances``); χ^l uses layer
    l+1's σ_w², the weights the gradient passes back through.
    """
    _functions(activation)
    sw2s = _per_layer_values("sw2", sw2, depth)
    sb2s = _per_layer_values("sb2", sb2, depth)
    for a, b in zip(sw2s, sb2s, strict=True):
        _check_variances(a, b)
    if not (math.isfinite(input_second_moment) and input_second_moment >= 0):
        raise ValueError(f"input_second_moment={input_second_moment!r} is invalid: a finite "
                         f"number >= 0")
    q = np.empty(depth)
    q[0] = sw2s[0] * input_second_moment + sb2s[0]
    for layer in range(1, depth):
        q[layer] = variance_map(activation, sw2s[layer], sb2s[layer], q[layer - 1])
    factors = np.array([chi(activation, sw2s[layer + 1], q[layer]) for layer in range(depth - 1)])
    return LayerPrediction(q, factors)


def _per_layer_values(name: str, value, depth: int) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * depth
    values = [float(v) for v in value]
    if len(values) != depth:
        raise ValueError(f"{name} has {len(values)} values: one per Linear layer, {depth}")
    return values


def _check_variances(sw2: float, sb2: float) -> None:
    if not (math.isfinite(sw2) and sw2 > 0):
        raise ValueError(f"sw2={sw2!r} is invalid: a finite number > 0")
    if not (math.isfinite(sb2) and sb2 >= 0):
        raise ValueError(f"sb2={sb2!r} is invalid: a finite number >= 0")


class TheoryDoesNotApply(ValueError):
    """The mean-field prediction has nothing to say about this net; the message says why."""


def init_variances(init: str, bias_init: str, sizes: Sequence[int],
                   activation: str) -> tuple[list[float], list[float]]:
    """Each Linear layer's σ_w² (= fan_in × Var W_ij) and σ_b² (= Var b_i) under gradlab's init
    specs (``gradlab.config.WEIGHT_INITS``), for ``sizes`` from input to output.

    Only the variances enter the wide-net limit, so uniform and orthogonal weights count as
    well as Gaussian ones: PyTorch's default is U(±1/√fan_in) for weights and biases alike,
    σ_w² = 1/3 and σ_b² = 1/(3 fan_in); an orthogonal matrix times GAIN, GAIN² min(fan_in,
    fan_out)/fan_out. Raises TheoryDoesNotApply for a net with no hidden layer or an init it
    does not know.
    """
    from .config import ConfigError, parse_init  # noqa: PLC0415  (config imports no torch)

    sizes = [int(s) for s in sizes]
    if len(sizes) < 3:
        raise TheoryDoesNotApply("a net with no hidden layer has no per-layer factor")
    try:
        name, arg = parse_init(init)
        bias_name, bias_arg = parse_init(bias_init, bias=True)
    except ConfigError as e:
        raise TheoryDoesNotApply(str(e)) from None
    kaiming = 2 / (1 + LEAKY_SLOPE**2) if activation == "leaky_relu" else 2.0
    sw2, sb2 = [], []
    for fan_in, fan_out in zip(sizes, sizes[1:]):
        variance = {  # Var W_ij
            "default": 1 / (3 * fan_in),
            "xavier_uniform": 2 / (fan_in + fan_out),
            "xavier_normal": 2 / (fan_in + fan_out),
            "kaiming_uniform": kaiming / fan_in,
            "kaiming_normal": kaiming / fan_in,
            "lecun_normal": 1 / fan_in,
            "orthogonal": (arg or 1.0) ** 2 * min(fan_in, fan_out) / (fan_in * fan_out),
            "normal": (arg or 0.0) ** 2,
            "uniform": (arg or 0.0) ** 2 / 3,
            "normal_fan_in": (arg or 0.0) / fan_in,
        }.get(name)
        if variance is None:
            raise TheoryDoesNotApply(f"init {init!r}: its weight variance is not known here")
        sw2.append(variance * fan_in)
        sb2.append({"default": 1 / (3 * fan_in), "zeros": 0.0,
                    "normal": (bias_arg or 0.0) ** 2}[bias_name])
    return sw2, sb2
