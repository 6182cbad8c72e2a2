"""Learned models: a DRIP model (embedding ``E``, scalar regularizer ``R`` and the settings of its
solver) or the unrolled baseline network, both built from one :class:`ModelConfig`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch

from ..errors import DripError, setting_type_problem
from ..operators import LinearOperator
from ..operators.convolution import PADDINGS
from ..solvers.datafit import checked_problem
from .adaptive import DEFAULT_EDGE_SCALE, edge_weights
from .convex import ConvexFilterRegularizer, PerChannelRegularizer
from .embedding import Embedding
from .leapfrog import LeapfrogRegularizer
from .patches import PatchAugmented, PatchMixture, PerChannelMixture
from .unrolled import UnrolledNetwork

# convex: the default, a convex lower-level problem; leapfrog: deeper and non-convex (see its
# module); unrolled: the paper's baseline network, no regularizer and no data-fit guarantee
ARCHITECTURES = ("convex", "leapfrog", "unrolled")
DEFAULT_LAYERS = {"convex": 3, "leapfrog": 3, "unrolled": 6}
# the largest value of a real-valued setting: above it float32 arithmetic overflows (an edge
# scale of 1e300 made every reweighting weight NaN, reported as weights out of range)
SETTING_MAX = 1e30


@dataclass
class ModelConfig:
    """Architecture and solver settings; saved with every model file."""

    image_channels: int = 1
    latent_channels: int = 0       # 0: as many as the image has channels
    architecture: str = "convex"
    n_filters: int = 16
    kernel_size: int = 5
    embedding_kernel_size: int = 3
    # how E extends the latent beyond its border (.embedding): "periodic" makes A E a circulant
    # for periodic operators (blur), whose projections are then exact in the Fourier basis;
    # drip train chooses it for them (training.trainer.operator_defaults)
    embedding_boundary: str = "symmetric"
    eps: float = 0.01
    group_size: int = 2            # 2: smoothed isotropic-TV-like pairs; 1: one potential per filter
    potential_scales: int = 1      # smoothed norms per group, at smoothing eps, 4 eps, 16 eps, ...
    dilation_levels: int = 2       # filter groups split over dilations 1, 2, 4, ... (multi-scale)
    layers: int = 0                # leapfrog layers / unrolled steps (0: DEFAULT_LAYERS)
    width: int = 32                # unrolled: channels of each residual CNN
    # lower-level solver at inference. Sharp models need many iterations: at a cap of 300 the
    # eps-0.001 tomography model stopped 11 of 32 crops at 10% noise short of their minimisers
    # (mean PSNR 0.06 dB lower); with 1000 all converge (290 on average). Blur models stop after
    # 70-85.
    max_iterations: int = 1000
    tolerance: float = 1e-4
    stationarity_tolerance: float = 0.05   # and the projected gradient this small (solvers.drip)
    projection_iterations: int = 50
    # relative accuracy of each inner projection (tightened per sample where the solve stalls,
    # see solvers.drip): 3e-2 gave the same PSNR and R (to 1e-4) as 1e-3 on 32 held-out 64x64
    # blur crops, at 0.26 instead of 0.40 s/image; 0.1 then took 14-25% less time than 3e-2 with
    # the blur sample model (32 crops, 1-10% noise; 25% fewer products with A on 64 crops at
    # 2%), PSNR within 0.01 dB, the same iterations; on tomography and inpainting, whose
    # projections already need the fewest Krylov steps, it changed nothing
    projection_tolerance: float = 0.1
    # passes of edge-adaptive reweighting after the first solve (0: none; convex regularizers
    # only; drip train --reweight trains with them, drip reconstruct --reweight overrides) and
    # their edge scale, see .adaptive
    reweight: int = 0
    edge_scale: float = DEFAULT_EDGE_SCALE
    # stopping tolerance of the passes whose solution only sets the edge weights (every pass but
    # the last; the stationarity test stays): at 1e-2 instead of 1e-4 the reweighted solve took
    # 14.0 instead of 17.4 s on 32 blur crops and 21.2 instead of 26.9 s on 32 tomography crops
    # (2% noise), with PSNR within 0.003 dB; over 1-10% noise and 96 crops PSNR moved by -0.01
    # to +0.02 dB on blur and -0.06 to 0 dB on tomography. A looser stationarity test for those
    # passes too (0.1 / 0.2 instead of 0.05) cut the tomography model's solve of 32 crops from
    # 10.5 to 8.5 / 8.0 s at 2% noise, but cost 0.04 / 0.09 dB (5%: 0.04 / 0.08): not taken
    guide_tolerance: float = 1e-2
    # stationarity test of the reweighted passes, which start from the previous pass's solution:
    # from there the iterate moves little at first, and at the first pass's 0.05 the last pass
    # stopped less converged (higher weighted R) than a pass started from CGLS; at 0.02 it ends
    # with a lower weighted R than that cold pass on every set measured, after 25-38% fewer
    # iterations (see DripModel.solve)
    reweight_stationarity_tolerance: float = 0.02
    # a last pass with a patch-mixture term (.patches; convex regularizers only): the mixture's
    # components (0: none; drip train --patch-components fits them to the training images) and
    # the term's weight (0: the pass is skipped; drip train chooses it on the validation split,
    # drip reconstruct --patch-weight overrides)
    patch_components: int = 0
    patch_weight: float = 0.0

    def __post_init__(self):
        if self.layers == 0:
            self.layers = DEFAULT_LAYERS.get(self.architecture, 3)

    @property
    def is_unrolled(self) -> bool:
        return self.architecture == "unrolled"

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """The config a model file or run folder recorded, checked setting by setting (a file may
        have been edited or damaged): each must have its default's type and a usable value."""
        if not isinstance(values, dict):
            raise ValueError("the model settings are not a JSON object")
        known = {f.name: f.default for f in fields(cls)}
        unknown = set(values) - set(known)
        if unknown:
            raise ValueError(f"unknown model settings: {', '.join(sorted(unknown))}")
        for name, value in values.items():
            default = known[name]
            problem = setting_type_problem(name, value, default)
            if problem:
                raise ValueError(f"model {problem}")
            if name == "embedding_boundary" and value not in PADDINGS:
                raise ValueError(f"model setting {name} = {value!r} must be one of "
                                 f"{', '.join(PADDINGS)}")
            least = 0 if name in ("latent_channels", "layers", "reweight",
                                  "patch_components") else 1
            if isinstance(default, int) and value < least:
                raise ValueError(f"model setting {name} = {value} must be at least {least}")
            problem = cls.number_problem(name, value) if isinstance(default, float) else None
            if problem:
                raise ValueError(f"model setting {name} = {value} {problem}")
        return cls(**values)

    @staticmethod
    def number_problem(name: str, value: float) -> str | None:
        """Why ``value`` cannot be the real-valued setting ``name`` (a model file's, or a
        command-line override such as ``--edge-scale``), or None: each is positive (the patch
        weight may be 0), finite, and at most :data:`SETTING_MAX`."""
        if not math.isfinite(value):
            return "must be a finite number"
        if name == "patch_weight" and value < 0:
            return "must not be negative"
        if name != "patch_weight" and value <= 0:
            return "must be positive"
        if value > SETTING_MAX:
            return f"must be at most {SETTING_MAX:.0e}".replace("e+", "e")
        return None

    def to_dict(self) -> dict:
        return asdict(self)

    def unused_fields(self) -> tuple[str, ...]:
        """The settings this architecture has no use for (drip train warns when one is given;
        drip info leaves them out)."""
        if self.is_unrolled:   # its own steps: no regularizer, embedding or solver
            return tuple(f.name for f in fields(self)
                         if f.name not in ("image_channels", "architecture", "layers", "width"))
        return ("width",) if self.architecture == "leapfrog" else ("layers", "width")


def require_setting_value(option: str, name: str, value: float) -> float:
    """``value``, given as ``option`` for the model setting ``name``, where a model file could
    hold it (:meth:`ModelConfig.number_problem`); :class:`DripError` naming the option
    otherwise."""
    problem = ModelConfig.number_problem(name, value)
    if problem:
        raise DripError(f"{option} {problem}, got {value:g}")
    return value


def build_model(config: ModelConfig) -> torch.nn.Module:
    """The model a config describes: :class:`DripModel` or :class:`UnrolledNetwork`."""
    if config.is_unrolled:
        return UnrolledNetwork(config.image_channels, config.layers, config.width)
    return DripModel(config)


def _check_widens(model: DripModel, what: str) -> None:
    """``ValueError`` unless ``model`` is one that :func:`per_channel_model` and
    :func:`widened_model` widen (:attr:`DripModel.widens_per_channel`)."""
    if not model.widens_per_channel:
        raise ValueError(f"{what} widens a single-channel model with the convex regularizer")


def per_channel_model(model: DripModel, channels: int) -> DripModel:
    """A single-channel DRIP model with the convex regularizer, on images of ``channels``
    channels: its embedding, regularizer and patch mixture act on each channel alone (``R(z)
    = sum_c R(z_c)``), while the data fit, as always, is each sample's over all its channels.
    The model is the same on each channel; only how colours go together is left unlearned
    (``drip reconstruct --each-channel``)."""
    _check_widens(model, "per_channel_model")
    prior = None if model.patch_prior is None else PerChannelMixture(model.patch_prior, channels)
    wide = DripModel(replace(model.config, image_channels=channels, latent_channels=channels),
                     parts=(model.embedding.per_channel(channels),
                            PerChannelRegularizer(model.regularizer, channels), prior))
    return wide.to(model.embedding.weight.device).eval()


def widened_model(model: DripModel, channels: int) -> DripModel:
    """A DRIP model of ``channels`` image and latent channels that is the single-channel
    ``model`` on each channel: its filter bank and embedding block-diagonal
    (:meth:`~.convex.ConvexFilterRegularizer.widened`), no patch mixture (a run fits its own).
    Unlike :func:`per_channel_model` it is a model of the family like any other, so training
    can go on from it on colour images and learn filters that mix the channels (``drip train
    --init``)."""
    _check_widens(model, "widened_model")
    config = replace(model.config, image_channels=channels, latent_channels=channels,
                     n_filters=channels * model.config.n_filters, patch_components=0)
    return DripModel(config, parts=(model.embedding.per_channel(channels),
                                    model.regularizer.widened(channels), None))


class DripModel(torch.nn.Module):
    """``u = E z`` with ``z`` the minimiser of ``R(z)`` under the data-fit constraint."""

    def __init__(self, config: ModelConfig, parts: tuple | None = None):
        """The model ``config`` describes, its parameters at their start; or, with ``parts``
        ``(embedding, regularizer, patch_prior or None)`` made elsewhere (the widenings
        :func:`per_channel_model` and :func:`widened_model`), a model of those parts."""
        super().__init__()
        if config.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {config.architecture!r} "
                             f"(available: {', '.join(ARCHITECTURES)})")
        self.config = config
        if parts is not None:
            self.embedding, self.regularizer, self.patch_prior = parts
            return
        latent = config.latent_channels or config.image_channels
        self.embedding = Embedding(latent, config.image_channels,
                                   config.embedding_kernel_size, config.embedding_boundary)
        common = dict(latent_channels=latent, image_channels=config.image_channels,
                      n_filters=config.n_filters, kernel_size=config.kernel_size, eps=config.eps,
                      group_size=config.group_size, potential_scales=config.potential_scales,
                      dilation_levels=config.dilation_levels)
        if config.architecture == "leapfrog":
            self.regularizer = LeapfrogRegularizer(**common, layers=config.layers)
        else:
            self.regularizer = ConvexFilterRegularizer(**common)
        if config.patch_components and config.architecture != "convex":
            raise ValueError("a patch mixture needs the convex architecture")
        self.patch_prior = (PatchMixture(config.patch_components, config.image_channels)
                            if config.patch_components else None)

    @property
    def has_patch_mixture(self) -> bool:
        """Whether the model has a fitted patch mixture, so a patch pass can run."""
        return self.patch_prior is not None and self.patch_prior.fitted

    def runs_patch_pass(self, patch_weight: float | None = None) -> bool:
        """Whether :meth:`solve` ends with the patch pass, at ``patch_weight`` (None: the
        model's own)."""
        weight = self.config.patch_weight if patch_weight is None else patch_weight
        return weight > 0 and self.has_patch_mixture

    @property
    def widens_per_channel(self) -> bool:
        """Whether :func:`per_channel_model` serves images of more channels with this model:
        one image and one latent channel, and the convex regularizer."""
        config = self.config
        return (config.architecture == "convex" and config.image_channels == 1
                and (config.latent_channels or 1) == 1)

    @property
    def reach(self) -> int:
        """The smallest image side the regularizer's filters fit in."""
        return self.regularizer.reach

    def pass_weights(self, u: torch.Tensor) -> torch.Tensor:
        """The pixel weights of a reweighting pass after the pass that gave the image ``u``
        (:func:`~.adaptive.edge_weights` at the model's edge scale); differentiable in ``u``."""
        return edge_weights(u, self.config.edge_scale)

    def solve(self, op: LinearOperator, b: torch.Tensor, radius: torch.Tensor, progress=None,
              patch_weight: float | None = None, **overrides):
        """Reconstruct a batch; returns :class:`drip_cli.solvers.drip.DripSolution`.
        ``progress(fraction)``, where given, hears of the samples each pass finishes, each pass
        an equal share of the work.

        With ``config.reweight = K > 0`` the solve is repeated ``K`` times with the edge weights
        of the previous solution (:mod:`.adaptive`), each pass started from the previous pass's
        solution (feasible, and close to the new minimiser) and stopped at the tighter
        ``config.reweight_stationarity_tolerance``. Against the earlier default, a pass started
        like the first from the CGLS solution, measured with the sample models on the held-out
        crops (32 per level; 64 for the second set): the pass ends with a lower weighted ``R``
        in every case (blur and tomography, 1-10% noise on the first set, 2 and 5% on the
        second) after 25-32% fewer iterations on blur and 31-38% fewer on tomography. Blur PSNR
        moves by at most 0.006 dB; tomography's falls by 0.07 / 0.06 / 0.01 / 0.01 dB at 1 / 2
        / 5 / 10%, but a pass run far tighter (tolerance 1e-6, stationarity 0.005, 2.4 times the
        iterations) lands at 32.10 / 29.94 dB at 2 / 5%, where the CGLS start stopped at 32.16 /
        29.97 and this one at 32.10 / 29.95: the CGLS start's extra 0.05 dB came from stopping
        early on its path, not from the minimiser. The passes before the last stop at the looser
        ``config.guide_tolerance``. With a fitted patch mixture and a positive ``patch_weight``
        (``None``: ``config.patch_weight``) one more pass adds the patch term (:mod:`.patches`),
        its components picked from the last solution, its pixel weights the last pass's, started
        there and stopped like the last pass. ``iterations`` counts all passes;
        ``regularizer_value`` is the unweighted ``R`` at the final solution."""
        from ..solvers.drip import solve_drip

        radius = checked_problem(op, b, radius)
        settings = self._settings(overrides)
        if self.config.reweight and not self.regularizer.convex:
            raise ValueError("reweighting needs a convex regularizer")
        passes = self.config.reweight
        guide = {**settings, "tolerance": max(settings["tolerance"], self.config.guide_tolerance)}
        warm = self._warm
        patch_weight = self.config.patch_weight if patch_weight is None else patch_weight
        with_patches = self.runs_patch_pass(patch_weight)
        total = passes + 1 + with_patches

        def share(i):   # pass i of the solve's passes reports its fraction as a share of the whole
            return None if progress is None else (lambda f: progress((i + f) / total))

        result = solve_drip(op, self.embedding, self.regularizer, b, radius, progress=share(0),
                            **(guide if passes else settings))
        guides = []
        for i in range(passes):
            guides.append(result.latent)
            weights = self.pass_weights(result.solution)
            stop = settings if i == passes - 1 else guide
            again = solve_drip(op, self.embedding, self.regularizer, b, radius, z0=result.latent,
                               pixel_weights=weights, progress=share(i + 1), **{**stop, **warm})
            again.iterations = again.iterations + result.iterations
            again.guide_latents = list(guides)
            result = again
        if with_patches:
            result = self.patch_pass(op, b, radius, result, patch_weight,
                                     progress=share(passes + 1), **overrides)
        return result

    def patch_pass(self, op: LinearOperator, b: torch.Tensor, radius: torch.Tensor, previous,
                   weight: float, progress=None, **overrides):
        """The patch-mixture pass (:mod:`.patches`) at ``weight`` after the solve ``previous``
        (a :class:`~drip_cli.solvers.drip.DripSolution` of these measurements): its components
        picked from ``previous.solution``, its pixel weights ``previous.pixel_weights``, started
        from ``previous.latent`` and stopped like a reweighted pass. Needs a fitted mixture."""
        from ..solvers.drip import solve_drip

        if not self.has_patch_mixture:
            raise ValueError("this model has no fitted patch mixture")
        regularizer = PatchAugmented(self.regularizer, self.embedding, self.patch_prior, weight)
        result = solve_drip(op, self.embedding, regularizer, b, radius, z0=previous.latent,
                            pixel_weights=previous.pixel_weights,
                            terms={"patch_labels": self.patch_prior.labels(previous.solution)},
                            progress=progress, **{**self._settings(overrides), **self._warm})
        result.iterations = result.iterations + previous.iterations
        result.guide_latents = [*(previous.guide_latents or []), previous.latent]
        return result

    def _settings(self, overrides: dict) -> dict:
        """The solver settings of the config, with ``overrides``."""
        config = self.config
        return {**dict(max_iterations=config.max_iterations, tolerance=config.tolerance,
                       stationarity_tolerance=config.stationarity_tolerance,
                       projection_iterations=config.projection_iterations,
                       projection_tolerance=config.projection_tolerance), **overrides}

    @property
    def _warm(self) -> dict:
        """The stopping test of a pass started from the previous pass's solution."""
        return {"stationarity_tolerance": self.config.reweight_stationarity_tolerance}
