"""A deeper, **non-convex** scalar regularizer: the paper's leapfrog residual network, made a true
scalar function of ``z``.

    y_0 = y_-1 = K z                                   (the convex model's filter bank)
    y_{j+1} = 2 y_j - y_{j-1} - a_j W_j^T tanh(W_j y_j + c_j),   j = 0 .. layers - 1
    R(z) = sum_g sum_k w_gk psi_gk(y_L)                 (the convex model's potentials)

The leapfrog (second-order, "least-action") update is the network DRIP uses; here it only
transforms the filter responses, and ``R`` is the potential of the final state, so ``R`` is a real
number whose value can be reported and compared, and ``grad R`` is its exact gradient
(automatic differentiation of ``value``, so the two agree by construction).

**It gives up the convexity guarantee.** The lower-level problem is then non-convex: the solver
finds a stationary point that fits the data (the data-fit guarantee is unchanged: the last step is
still a projection onto the data-fit set), but not necessarily the global minimiser, and the result
can depend on the starting point. There is no closed-form Lipschitz bound for ``grad R`` either:
the solver backtracks from the filter bank's curvature, down to a step floor of
``1 / (STEP_FLOOR_FACTOR * curvature)``, which is a safeguard, not a guarantee.

Initialisation: ``a_j = 2e-4`` and random ``W_j`` with responses of order one, so the network
starts close to the identity (``R`` starts close to the convex model, itself smoothed TV plus a
filter bank) and its parameters have non-vanishing gradients from the first step. ``a_j`` is
trained in log space: as a raw parameter, Adam's first step multiplied it by 15 and validation
PSNR fell from 31.3 to 29.9 dB within 60 steps.

Measured (blur sigma 2, noise 1-5%, 10 minutes on 2 CPU cores, the data of the sample model):
168 steps of 3.5 s; held-out PSNR 33.05 / 32.29 / 30.96 / 29.69 dB at 1 / 2 / 5 / 10% noise,
level with the convex default (33.07 / 32.30 / 31.00 / 29.73 after 478 steps) at twice its
reconstruction time (0.41-0.50 s per 64x64 image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..operators.convolution import conv2d_adjoint
from .convex import ConvexFilterRegularizer

LAYER_GAIN = 10.0          # W_j y is of order one for filter responses of order 0.1
FORCE_SCALE = 2e-4         # initial a_j: the layers start as a small perturbation of the identity
STEP_FLOOR_FACTOR = 1e3    # the solver's smallest step is 1 / (this x the filter-bank curvature)


class LeapfrogRegularizer(torch.nn.Module):
    convex = False

    def __init__(self, latent_channels: int, image_channels: int = 1, n_filters: int = 16,
                 kernel_size: int = 5, eps: float = 0.01, group_size: int = 2, seed: int = 0,
                 potential_scales: int = 1, dilation_levels: int = 1, layers: int = 3,
                 layer_kernel_size: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError("layers must be at least 1")
        self.head = ConvexFilterRegularizer(latent_channels, image_channels, n_filters, kernel_size,
                                            eps, group_size, seed, potential_scales, dilation_levels)
        gen = torch.Generator().manual_seed(seed + 1)
        fan_in = n_filters * layer_kernel_size**2
        self.layer_filters = torch.nn.Parameter(
            LAYER_GAIN / fan_in**0.5 * torch.randn(layers, n_filters, n_filters, layer_kernel_size,
                                                   layer_kernel_size, generator=gen))
        self.layer_bias = torch.nn.Parameter(torch.zeros(layers, n_filters))
        # a_j = FORCE_SCALE * exp(s_j): Adam moves each parameter by about lr per step, which
        # on a_j itself (2e-4) was a 15-fold jump at the first step; on s_j it is 0.3%
        self.layer_log_scale = torch.nn.Parameter(torch.zeros(layers))

    @property
    def reach(self) -> int:
        """The filter bank's widest padding (the layers pad with zeros in response space)."""
        return self.head.reach

    def final_state(self, z: torch.Tensor) -> torch.Tensor:
        """``y_L``, the responses after the leapfrog layers."""
        y_prev = y = self.head.responses(z)
        pad = self.layer_filters.shape[-1] // 2
        scales = FORCE_SCALE * self.layer_log_scale.exp()
        for weight, bias, scale in zip(self.layer_filters, self.layer_bias, scales):
            weight = weight.to(z.dtype)
            activation = torch.tanh(F.conv2d(y, weight, bias.to(z.dtype), padding=pad))
            force = scale.to(z.dtype) * conv2d_adjoint(activation, weight, pad)
            y_prev, y = y, 2 * y - y_prev - force
        return y

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """``R(z)`` per sample, shape ``(N,)``."""
        return self.head.potential(self.final_state(z))

    def value_and_gradient(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R(z), grad R(z))`` by automatic differentiation. Where gradients are being
        recorded, the gradient keeps its graph (differentiable in ``z`` and the parameters, for
        Hessian products and the implicit training gradient); inside ``torch.no_grad`` it does not."""
        record = torch.is_grad_enabled()
        with torch.enable_grad():
            point = z if z.requires_grad else z.detach().requires_grad_(True)
            value = self.value(point)
            (gradient,) = torch.autograd.grad(value.sum(), point, create_graph=record)
        return (value if record else value.detach()), gradient

    def gradient(self, z: torch.Tensor) -> torch.Tensor:
        return self.value_and_gradient(z)[1]

    def curvature_and_lipschitz_bound(self, shape: tuple[int, ...] | None = None):
        """``(curvature, floor)``: the filter bank's curvature starts the solver's backtracking;
        ``STEP_FLOOR_FACTOR`` times it is the smallest step's inverse (see the module docstring).
        ``shape``, the latents' (for the convex bank's bound), changes nothing here."""
        curvature, _ = self.head.curvature_and_lipschitz_bound()
        return curvature, STEP_FLOOR_FACTOR * curvature
