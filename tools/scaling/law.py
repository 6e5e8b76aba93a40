"""The Chinchilla scaling law L(N, D) = E + A / N^alpha + B / D^beta, and its fit (approach 3).

The fit follows Hoffmann et al. (2022) as re-done by Besiroglu et al. (2024): a Huber loss
(delta 1e-3) between log L and the law's log in the log-sum-exp form
LSE(a - alpha log N, b - beta log D, e) with A = exp(a), B = exp(b), E = exp(e), minimised by
L-BFGS from a grid of starting points; the best optimum wins. Intervals come from refits on
bootstrap resamples of the runs.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp, softmax

HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of starts over (a, b, e, alpha, beta): 6 x 6 x 5 x 5 x 5 = 4500 points.
START_GRID = (
    np.arange(0, 30, 5.0),
    np.arange(0, 30, 5.0),
    np.arange(-1, 1.5, 0.5),
    np.arange(0, 2.5, 0.5),
    np.arange(0, 2.5, 0.5),
)


@dataclass(frozen=True)
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> Law:
        a, b, e, alpha, beta = (float(x) for x in theta)
        return cls(
            E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta
        )

    def loss(self, params, tokens):
        params, tokens = np.asarray(params, float), np.asarray(tokens, float)
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal(self, compute: float) -> dict[str, float]:
        """The (params, tokens) minimising the loss at `compute` FLOPs = 6 N D, and that loss:
        N = G (C/6)^(beta/(alpha+beta)), D = (C/6) / N, G = (alpha A / (beta B))^(1/(alpha+beta))."""
        total = self.alpha + self.beta
        scale = (self.alpha * self.A / (self.beta * self.B)) ** (1 / total)
        params = float(scale * (compute / 6) ** (self.beta / total))
        tokens = compute / (6 * params)
        return {"params": params, "tokens": tokens, "loss": float(self.loss(params, tokens))}

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray):
    """Huber loss of the law's log-sum-exp prediction against log L, and its gradient."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    residual = logsumexp(terms, axis=0) - log_l
    small = np.abs(residual) <= HUBER_DELTA
    value = np.where(small, 0.5 * residual**2, HUBER_DELTA * (np.abs(residual) - 0.5 * HUBER_DELTA))
    slope = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)  # d huber / d residual
    weights = softmax(terms, axis=0) * slope  # d LSE / d term, times the slope
    grad = np.array(
        [
            weights[0].sum(),
            weights[1].sum(),
            weights[2].sum(),
            -(weights[0] * log_n).sum(),
            -(weights[1] * log_d).sum(),
        ]
    )
    return value.sum(), grad


def _grid_values(log_n, log_d, log_l) -> tuple[np.ndarray, np.ndarray]:
    """Every grid start and the objective there (vectorised: one pass over the grid)."""
    starts = np.array(list(itertools.product(*START_GRID)))
    a, b, e, alpha, beta = (starts[:, i : i + 1] for i in range(5))
    terms = np.stack(
        [a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(starts), len(log_n)))]
    )
    residual = np.abs(logsumexp(terms, axis=0) - log_l)
    huber = np.where(
        residual <= HUBER_DELTA,
        0.5 * residual**2,
        HUBER_DELTA * (residual - 0.5 * HUBER_DELTA),
    )
    return starts, huber.sum(axis=1)


# The Huber slopes are at most delta: scipy's default tolerances would stop far from the optimum.
TOLERANCES = {"gtol": 1e-14, "ftol": 1e-15, "maxiter": 5000}
# L-BFGS from all 4500 starts takes a minute; from the best 64 it finds the same optimum.
DEFAULT_STARTS = 64


def fit(params, tokens, loss, starts: int | None = DEFAULT_STARTS, extra_starts=()) -> Law:
    """The law fitted to runs (N, D, L). L-BFGS runs from the `starts` grid points with the
    lowest objective (None: from every one), plus any `extra_starts`."""
    log_n, log_d, log_l = (np.log(np.asarray(x, float)) for x in (params, tokens, loss))
    if not (len(log_n) == len(log_d) == len(log_l)):
        raise ValueError("params, tokens and loss must have one value per run")
    grid, values = _grid_values(log_n, log_d, log_l)
    chosen = grid if starts is None else grid[np.argsort(values)[:starts]]
    best = None
    for start in [*chosen, *extra_starts]:
        result = minimize(
            _objective,
            start,
            args=(log_n, log_d, log_l),
            jac=True,
            method="L-BFGS-B",
            options=TOLERANCES,
        )
        if best is None or result.fun < best.fun:
            best = result
    return Law.from_theta(best.x)


def theta(law: Law) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def bootstrap(params, tokens, loss, law: Law, samples: int, seed: int = 0) -> list[Law]:
    """Refits on `samples` resamples of the runs (with replacement), each started from the
    full fit and the best few grid points."""
    rng = np.random.default_rng(seed)
    params, tokens, loss = (np.asarray(x, float) for x in (params, tokens, loss))
    laws = []
    for _ in range(samples):
        pick = rng.integers(0, len(params), len(params))
        laws.append(
            fit(params[pick], tokens[pick], loss[pick], starts=4, extra_starts=[theta(law)])
        )
    return laws


def interval(values, level: float = 0.95) -> list[float]:
    """The central `level` percentile interval."""
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def isoflop_minima(params, tokens, loss, tolerance: float = 0.1) -> dict | None:
    """Chinchilla's iso-FLOP profiles: runs of the same compute C = 6ND (within `tolerance`,
    relative) with at least 3 model sizes get a parabola of loss in log N; its minimum, where
    it lies inside the sizes run, is that compute's optimal N (and D = C / 6N). With two such
    budgets or more, N_opt and D_opt are fitted as powers of C. None when no budget qualifies."""
    params, tokens, loss = (np.asarray(x, float) for x in (params, tokens, loss))
    compute = 6 * params * tokens
    order = np.argsort(compute)
    groups: list[list[int]] = []
    for index in order:
        if groups and compute[index] <= compute[groups[-1][0]] * (1 + tolerance):
            groups[-1].append(index)
        else:
            groups.append([index])
    minima = []
    for group in groups:
        log_n = np.log(params[group])
        if len(set(log_n.round(6))) < 3:
            continue
        curve = np.polyfit(log_n, loss[group], 2)
        if curve[0] <= 0:
            continue  # no minimum: the sizes do not bracket the optimum
        best = -curve[1] / (2 * curve[0])
        if not log_n.min() <= best <= log_n.max():
            continue
        budget = float(np.exp(np.log(compute[group]).mean()))
        n_opt = float(np.exp(best))
        minima.append(
            {
                "compute": budget,
                "params": n_opt,
                "tokens": budget / (6 * n_opt),
                "loss": float(np.polyval(curve, best)),
                "runs": len(group),
            }
        )
    if not minima:
        return None
    result: dict = {"minima": minima}
    if len(minima) >= 2:
        log_c = np.log([m["compute"] for m in minima])
        for key in ("params", "tokens"):
            slope, intercept = np.polyfit(log_c, np.log([m[key] for m in minima]), 1)
            # key_opt = coefficient * C^exponent
            result[key] = {"exponent": float(slope), "coefficient": float(np.exp(intercept))}
    return result
