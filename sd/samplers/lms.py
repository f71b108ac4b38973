"""LMS sampler: the probability-flow ODE stepped with a linear multistep method of order up to 4 in sigma space.

No tutorial counterpart (the tutorial has DDPM only). Original: k-diffusion `sampling.py` (sample_lms,
linear_multistep_coeff); diffusers' LMSDiscreteScheduler, which this matches. Reference: Karras et al. 2022 (the ODE
dx/dσ = (x - D(x; σ)) / σ) stepped with the classic Adams–Bashforth family on the uneven grid of sigmas.
"""

import torch

from ..ddpm import NoiseModel
from .base import SigmaSampler

ORDER = 4  # k-diffusion sample_lms and diffusers' step(order=4) default


def lms_coefficient(nodes: list[float], j: int, lo: float, hi: float) -> float:
    """∫_lo^hi L_j(τ) dτ, L_j the Lagrange basis polynomial that is 1 at nodes[j] and 0 at the other nodes.

    Exact: L_j (degree len(nodes) - 1 <= 3) is expanded in powers of u = τ - lo (well conditioned: |u| is at most a few
    steps wide) and integrated term by term, ∫_0^(hi - lo) u^n du = (hi - lo)^(n+1) / (n+1).
    """
    poly = [1.0]  # coefficients of u^0, u^1, ...
    for k, node in enumerate(nodes):
        if k == j:
            continue
        root, scale = node - lo, nodes[j] - node
        poly = [(a - root * b) / scale for a, b in zip([0.0] + poly, poly + [0.0])]  # poly *= (u - root) / scale
    h = hi - lo
    return sum(c * h ** (n + 1) / (n + 1) for n, c in enumerate(poly))


class LMSSampler(SigmaSampler):
    """Each step reuses the slopes of the previous steps, so one model evaluation per step buys up to 4th order.

    The only state: self.derivatives, the slopes d of the last (up to ORDER) calls, newest last. It starts empty
    because a sampler is built per generation, and it is keyed to calls, not to positions in the full schedule: after
    set_strength trims the noisiest steps, the first call is a 1st-order (Euler) step, as in k-diffusion.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.derivatives: list[torch.Tensor] = []

    def step(self, i: int, x: torch.Tensor, model: NoiseModel) -> torch.Tensor:
        sigma = self.sigmas[i]
        d = (x - self.denoise(model, x, sigma, self.timesteps[i])) / sigma  # dx/dσ at σ_i (Karras et al. eq. 3)
        self.derivatives = (self.derivatives + [d])[-ORDER:]
        order = min(i + 1, ORDER)
        if len(self.derivatives) != order:
            raise RuntimeError(f"LMS step {i} found {len(self.derivatives) - 1} earlier slopes, expected {order - 1}: call "
                               "step(i) once each for i = 0, 1, 2, ... in order, on a fresh sampler")
        # Adams–Bashforth on an uneven grid: x_{i+1} = x_i + Σ_j c_j d_{i-j}, c_j = ∫_{σ_i}^{σ_{i+1}} L_j(σ) dσ,
        # L_j the Lagrange basis through σ_i, σ_{i-1}, ..., σ_{i-order+1}.
        sigmas = self.sigmas.tolist()
        nodes = [sigmas[i - j] for j in range(order)]
        coeffs = [lms_coefficient(nodes, j, sigmas[i], sigmas[i + 1]) for j in range(order)]
        return x + sum(c * d_j for c, d_j in zip(coeffs, reversed(self.derivatives)))
