"""TRPO's machinery: the Fisher-vector product, conjugate gradient, the natural step and the line search.

The notes (docs/math.md §3) state TRPO as

    maximise  L(theta') = E_{s,a ~ pi_theta}[ pi_theta'(a|s) / pi_theta(a|s) * A(s, a) ]
    subject to  E_s[ KL(pi_theta'(.|s) || pi_theta(.|s)) ] <= delta      (the notes put the new policy first;
                                                                      the code measures KL(old || new) as the
                                                                      TRPO/PPO papers do: docs/math.md, note 6)

Linearising L (gradient g) and taking the KL to second order (its Hessian at theta' = theta is the Fisher
matrix F) gives the step x = sqrt(2 delta / (s^T F s)) * s with s = F^{-1} g. F is never formed: conjugate
gradient needs only products F v, which double back-propagation of the mean KL gives. Because both
approximations can be off, a backtracking line search accepts a step only if the *actual* KL stays within
delta and the *actual* surrogate improves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def flat_grad(output: Tensor, params: Sequence[Tensor], create_graph: bool = False,
              retain_graph: bool | None = None) -> Tensor:
    """Gradient of a scalar `output` with respect to `params`, concatenated into one flat vector.

    Parameters that `output` does not depend on contribute zeros.
    """
    grads = torch.autograd.grad(output, list(params), create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def fisher_vector_product(mean_kl: Tensor, params: Sequence[Tensor],
                          damping: float = 0.0) -> Callable[[Tensor], Tensor]:
    """v -> (F + damping I) v, with F the Hessian of the mean KL at the current parameters.

    Args:
        mean_kl: scalar E_s[KL(pi_old(.|s) || pi_theta(.|s))] built with pi_old detached, so that it is 0 with
            zero gradient at theta = theta_old and its Hessian there is the Fisher information matrix.
        params: the policy parameters theta.
        damping: Tikhonov term that keeps conjugate gradient stable when F is near singular.
    Returns:
        A function of a flat vector v (same length as the flattened params) returning the flat F v.
    """
    kl_grad = flat_grad(mean_kl, params, create_graph=True)

    def product(vector: Tensor) -> Tensor:
        # grad (grad KL . v) = H v; retain the graph so the product can be taken for many v.
        hessian_vector = flat_grad(kl_grad @ vector.detach(), params, retain_graph=True)
        return hessian_vector + damping * vector

    return product


def conjugate_gradient(matrix_vector: Callable[[Tensor], Tensor], b: Tensor, iterations: int = 10,
                       residual_tolerance: float = 1e-10) -> Tensor:
    """Solve A x = b for symmetric positive-definite A, given only the product x -> A x (Hestenes-Stiefel).

    In exact arithmetic it converges in at most len(b) iterations; TRPO uses about 10.
    """
    x = torch.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual @ residual
    for _ in range(iterations):
        if residual_sq <= residual_tolerance:
            break
        product = matrix_vector(direction)
        step = residual_sq / (direction @ product)
        x = x + step * direction
        residual = residual - step * product
        new_residual_sq = residual @ residual
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x


def natural_gradient_step(gradient: Tensor, fisher_product: Callable[[Tensor], Tensor], max_kl: float,
                          cg_iterations: int = 10) -> tuple[Tensor, Tensor]:
    """The full TRPO step: s = F^{-1} g by conjugate gradient, scaled so that 1/2 x^T F x = max_kl.

    Returns (step, expected_improvement), where expected_improvement = g . step is the linear model's gain.
    """
    if max_kl <= 0:
        raise ValueError(f"max_kl must be > 0, got {max_kl}")
    direction = conjugate_gradient(fisher_product, gradient, cg_iterations)
    curvature = direction @ fisher_product(direction)
    scale = torch.sqrt(2.0 * max_kl / curvature.clamp(min=1e-12))
    step = scale * direction
    return step, gradient @ step


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of `backtracking_line_search`.

    accepted: whether any fraction of the step was accepted (if not, the parameters must not move).
    fraction: the accepted fraction of the full step (0.0 when rejected).
    improvement: actual surrogate improvement at that fraction.
    kl: actual mean KL at that fraction.
    tries: number of fractions evaluated.
    """

    accepted: bool
    fraction: float
    improvement: float
    kl: float
    tries: int


def backtracking_line_search(evaluate: Callable[[float], tuple[float, float]], expected_improvement: float,
                             max_kl: float, max_backtracks: int = 10, shrink: float = 0.5,
                             accept_ratio: float = 0.0) -> LineSearchResult:
    """Try fractions 1, shrink, shrink^2, ... of the full step; accept the first that keeps the trust region.

    Accepts fraction f only if kl(f) <= max_kl and improvement(f) > 0 and
    improvement(f) >= accept_ratio * f * expected_improvement (TRPO's Armijo-style condition).

    Args:
        evaluate: f -> (surrogate improvement, mean KL) after moving the parameters by f times the full step
            (from the *old* parameters). The caller restores the parameters if nothing is accepted.
        expected_improvement: g . full_step, from `natural_gradient_step`.
        max_kl: the trust region's delta.
    """
    fraction = 1.0
    for attempt in range(1, max_backtracks + 1):
        improvement, kl = evaluate(fraction)
        finite = improvement == improvement and kl == kl  # NaN never passes
        enough = improvement >= accept_ratio * fraction * expected_improvement
        if finite and kl <= max_kl and improvement > 0 and enough:
            return LineSearchResult(True, fraction, float(improvement), float(kl), attempt)
        fraction *= shrink
    return LineSearchResult(False, 0.0, 0.0, 0.0, max_backtracks)
