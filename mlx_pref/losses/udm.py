"""BCO's underlying distribution matching (UDM): density-ratio weights for undesirable rows.

When desirable and undesirable prompts come from different distributions, BCO reweights each
undesirable row by an estimate of ``p_desirable(x) / p_undesirable(x)`` for its prompt ``x``.
TRL 1.13 (``trl/experimental/bco/bco_trainer.py``) fits scikit-learn's
``LogisticRegression(class_weight="balanced")`` on prompt embeddings of ``prompt_sample_size``
desirable and as many undesirable prompts, then weights undesirable rows by
``clip(P / (1 - P + 1e-8), min_density_ratio, max_density_ratio)``, ``P`` the classifier's
probability that the prompt is desirable.

This module reimplements that without scikit-learn: the same L2-regularised, class-balanced
logistic regression (``½‖w‖² + C·Σ sᵢ·log(1 + exp(-yᵢ(w·xᵢ + b)))``, intercept not
penalised, ``C = 1``) solved to a tight tolerance with Newton's method (conjugate-gradient
steps, float64 NumPy), so it reaches the same optimum sklearn's lbfgs approximates.
Embeddings are whatever the trainer supplies (mlx-pref uses the policy's mean-pooled last
hidden state over the prompt tokens, see :func:`mean_pool`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_pref.losses.base import ArrayLike


def _as_matrix(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, mx.array):
        x = np.asarray(x.astype(mx.float32))
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (rows, embedding_dim), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _expit(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


@dataclass
class DensityRatioClassifier:
    """A fitted logistic regression ``P(desirable | x) = σ(x·coef + intercept)``."""

    coef: np.ndarray
    intercept: float
    C: float = 1.0
    class_weight: str | None = "balanced"
    n_iter: int = 0

    def decision_function(self, embeddings: ArrayLike) -> np.ndarray:
        """Logit ``x·coef + intercept`` per row (float64)."""
        x = _as_matrix(embeddings, "embeddings")
        if x.shape[1] != self.coef.shape[0]:
            raise ValueError(
                f"embeddings have dimension {x.shape[1]}, the classifier was fit on "
                f"{self.coef.shape[0]}"
            )
        return x @ self.coef + self.intercept

    def predict_proba(self, embeddings: ArrayLike) -> np.ndarray:
        """Probability that each prompt comes from the desirable set (sklearn's column 1)."""
        return _expit(self.decision_function(embeddings))

    def score(self, embeddings: ArrayLike, desirable: ArrayLike) -> float:
        """Accuracy on labelled rows (``desirable`` is 1/True for desirable prompts)."""
        labels = np.asarray(desirable).astype(bool)
        return float(np.mean((self.decision_function(embeddings) > 0) == labels))

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready parameters (TRL pickles its sklearn model instead)."""
        return {
            "coef": [float(v) for v in self.coef],
            "intercept": float(self.intercept),
            "C": float(self.C),
            "class_weight": self.class_weight,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DensityRatioClassifier:
        """Rebuild a classifier saved with :meth:`state_dict`."""
        return cls(
            coef=np.asarray(state["coef"], dtype=np.float64),
            intercept=float(state["intercept"]),
            C=float(state.get("C", 1.0)),
            class_weight=state.get("class_weight", "balanced"),
        )


def _conjugate_gradient(
    hess_vec, rhs: np.ndarray, precond: np.ndarray, rtol: float, max_iter: int
) -> np.ndarray:
    x = np.zeros_like(rhs)
    r = rhs.copy()
    z = r / precond
    p = z.copy()
    rz = r @ z
    target = rtol * np.linalg.norm(rhs)
    for _ in range(max_iter):
        if np.linalg.norm(r) <= target:
            break
        hp = hess_vec(p)
        curvature = p @ hp
        if curvature <= 0:
            break
        step = rz / curvature
        x += step * p
        r -= step * hp
        z = r / precond
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def fit_density_ratio_classifier(
    desirable_embeddings: ArrayLike,
    undesirable_embeddings: ArrayLike,
    *,
    C: float = 1.0,
    class_weight: str | None = "balanced",
    max_iter: int = 100,
    tol: float = 1e-10,
) -> DensityRatioClassifier:
    """Fit the UDM classifier (desirable = 1, undesirable = 0) on prompt embeddings.

    Minimises ``½‖w‖² + C·Σ sᵢ·log(1 + exp(-yᵢ(w·xᵢ + b)))`` with ``sᵢ = n / (2·n_class)``
    for ``class_weight="balanced"`` (TRL's setting) or 1 for ``None``. Newton iterations stop
    when the largest gradient entry falls below ``tol`` times its starting value.
    """
    xd = _as_matrix(desirable_embeddings, "desirable_embeddings")
    xu = _as_matrix(undesirable_embeddings, "undesirable_embeddings")
    if xd.shape[0] == 0 or xu.shape[0] == 0:
        raise ValueError("UDM needs at least one desirable and one undesirable prompt embedding")
    if xd.shape[1] != xu.shape[1]:
        raise ValueError(
            f"desirable and undesirable embeddings differ in dimension: {xd.shape[1]} vs "
            f"{xu.shape[1]}"
        )
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C}")
    if class_weight not in ("balanced", None):
        raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
    n_d, n_u = xd.shape[0], xu.shape[0]
    n = n_d + n_u
    x = np.concatenate([np.concatenate([xd, xu]), np.ones((n, 1))], axis=1)
    y = np.concatenate([np.ones(n_d), -np.ones(n_u)])
    if class_weight == "balanced":
        s = np.concatenate([np.full(n_d, n / (2.0 * n_d)), np.full(n_u, n / (2.0 * n_u))])
    else:
        s = np.ones(n)
    reg = np.ones(x.shape[1])
    reg[-1] = 0.0  # the intercept is not penalised

    def objective(theta: np.ndarray) -> float:
        margins = y * (x @ theta)
        return 0.5 * float(reg @ theta**2) + C * float(s @ np.logaddexp(0.0, -margins))

    theta = np.zeros(x.shape[1])
    g0 = None
    n_iter = 0
    while n_iter < max_iter:
        n_iter += 1
        margins = y * (x @ theta)
        grad = reg * theta - C * (x.T @ (s * y * _expit(-margins)))
        gmax = float(np.max(np.abs(grad)))
        if g0 is None:
            g0 = max(gmax, 1e-300)
        if gmax <= tol * g0:
            break
        d = C * s * _expit(margins) * _expit(-margins)

        def hess_vec(v: np.ndarray, d: np.ndarray = d) -> np.ndarray:
            return reg * v + x.T @ (d * (x @ v))

        precond = np.maximum(reg + (x**2).T @ d, 1e-12)
        forcing = min(0.5, np.sqrt(gmax / g0))
        step_dir = _conjugate_gradient(
            hess_vec, -grad, precond, rtol=forcing * 1e-2, max_iter=max(50, 2 * x.shape[1])
        )
        f0 = objective(theta)
        slope = float(grad @ step_dir)
        if slope >= 0:  # not a descent direction (should not happen): fall back to -grad
            step_dir, slope = -grad, -float(grad @ grad)
        step = 1.0
        while step > 1e-12 and objective(theta + step * step_dir) > f0 + 1e-4 * step * slope:
            step *= 0.5
        theta = theta + step * step_dir
    return DensityRatioClassifier(
        coef=theta[:-1].copy(),
        intercept=float(theta[-1]),
        C=float(C),
        class_weight=class_weight,
        n_iter=n_iter,
    )


def density_ratio_weights(
    classifier: DensityRatioClassifier,
    undesirable_embeddings: ArrayLike,
    *,
    min_density_ratio: float = 0.5,
    max_density_ratio: float = 10.0,
) -> mx.array:
    """Per-row UDM weights ``clip(P/(1 - P + 1e-8), min, max)`` for undesirable prompts.

    Pass the result to ``preference_loss("bco", ..., udm_weights=...)``. An empty batch of
    undesirable rows gives an empty array.
    """
    if not 0 <= min_density_ratio <= max_density_ratio:
        raise ValueError(
            "need 0 <= min_density_ratio <= max_density_ratio, got "
            f"{min_density_ratio} and {max_density_ratio}"
        )
    x = _as_matrix(undesirable_embeddings, "undesirable_embeddings")
    if x.shape[0] == 0:
        return mx.zeros((0,), dtype=mx.float32)
    prob = classifier.predict_proba(x)
    ratio = np.clip(prob / (1.0 - prob + 1e-8), min_density_ratio, max_density_ratio)
    return mx.array(ratio.astype(np.float32))


def sample_prompt_indices(
    num_rows: int, prompt_sample_size: int = 1024, *, seed: int | None = None
) -> np.ndarray:
    """Indices of the prompts to embed for fitting: ``min(num_rows, prompt_sample_size)``
    draws with replacement, as TRL's ``np.random.choice`` (here from a seeded Generator)."""
    if num_rows <= 0:
        raise ValueError("cannot sample prompts from an empty dataset")
    if prompt_sample_size <= 0:
        raise ValueError(f"prompt_sample_size must be > 0, got {prompt_sample_size}")
    rng = np.random.default_rng(seed)
    return rng.choice(num_rows, size=min(num_rows, prompt_sample_size), replace=True)


def mean_pool(hidden_states: mx.array, mask: ArrayLike) -> mx.array:
    """Mean of ``hidden_states`` ``(B, T, H)`` over positions where ``mask`` ``(B, T)`` is 1.

    The prompt embedding mlx-pref feeds to UDM (rows with an empty mask give zeros).
    """
    m = (mask if isinstance(mask, mx.array) else mx.array(mask)).astype(mx.float32)
    h = hidden_states.astype(mx.float32)
    total = (h * m[..., None]).sum(axis=1)
    return total / mx.maximum(m.sum(axis=1), 1.0)[:, None]
