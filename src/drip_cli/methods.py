"""Reconstruction methods behind ``drip reconstruct --method``.

A method turns a batch of measurements into images that satisfy the data-fit constraint
``||A u - b|| <= radius``; its result carries the regularizer value per sample when the method has
a regularizer (the file then stores NaN for CGLS).
"""

from __future__ import annotations

import torch

from .errors import DripError
from .operators import LinearOperator, norm_bound
from .regularizers.model import per_channel_model, require_setting_value
from .solvers import LINALG_FAILURES, SolverResult, cgls, constrained_tv, total_variation


class ReconstructionMethod:
    name: str = ""

    def solve(self, op: LinearOperator, b: torch.Tensor, radius: torch.Tensor,
              progress=None) -> SolverResult:
        """Reconstruct a batch. ``progress(fraction)``, where given, is called now and then with
        the share of the batch's work done (0 to 1; iterative methods report samples as they
        finish, fast ones may not report at all)."""
        raise NotImplementedError

    def check(self, data, warn) -> dict:
        """Refuse data this method cannot serve (raise), ``warn(message)`` about doubtful data,
        and return extra attributes for the output file."""
        return {}

    def set_max_iterations(self, n: int) -> None:
        """Cap the solver's iterations (``drip reconstruct --max-iterations``)."""
        self.max_iterations = n


class CGLSMethod(ReconstructionMethod):
    """CGLS from zero, stopped per sample by the discrepancy principle (no regularizer)."""

    name = "cgls"

    def __init__(self, max_iterations: int = 1000):
        self.max_iterations = max_iterations

    def solve(self, op, b, radius, progress=None):   # milliseconds: nothing to report
        return cgls(op, b, radius, max_iterations=self.max_iterations)


class TVMethod(ReconstructionMethod):
    """Constrained isotropic total variation (regularizer value: ``TV(u)``)."""

    name = "tv"

    def __init__(self, max_iterations: int = 5000, tolerance: float = 1e-3):
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self._norms: dict[int, float] = {}

    def solve(self, op, b, radius, progress=None):
        key = id(op)
        if key not in self._norms:  # one norm bound per operator, not per batch
            self._norms[key] = norm_bound(op, device=b.device)
        finished = None if progress is None else \
            (lambda iteration, active: progress(1 - active / len(b)))
        result = constrained_tv(op, b, radius, op_norm=self._norms[key],
                                max_iterations=self.max_iterations, tolerance=self.tolerance,
                                progress=finished)
        result.regularizer_value = total_variation(result.solution.double())
        return result


CLASSICAL_METHODS = {"cgls": CGLSMethod, "tv": TVMethod}


class LearnedMethod(ReconstructionMethod):
    """A trained model: ``drip`` (``u = E z*``, ``z*`` minimising ``R(z)`` under the data fit)
    or ``unrolled`` (the baseline network; its data fit is whatever its steps reach)."""

    def __init__(self, model, info, sha256: str, path=None):
        self.model, self.info, self.sha256 = model, info, sha256
        self.path = path   # the model file, where it was loaded from one
        self.kind = "unrolled" if info.config.is_unrolled else "drip"
        self.name = self.kind   # drip evaluate renames models that share a kind
        self.any_size = False   # --any-size: images of another height and width are served
        self.each_channel = False   # --each-channel: a 1-channel drip model on each channel
        self._loaded = model   # self.model is this, or its widening to a file's channels

    @classmethod
    def load(cls, path) -> LearnedMethod:
        from .io.models import load_model, resolve_model_path

        path = resolve_model_path(path)
        return cls(*load_model(path), path=path)

    def check(self, data, warn) -> dict:
        trained, shape = tuple(self.info.image_shape), tuple(data.image_shape)
        serving = self.model.config.image_channels if self.kind == "drip" else trained[0]
        if serving != shape[0]:   # (a model already serving these channels is kept as it is)
            self.model = self._model_for_channels(trained[0], shape, data.path)
        if trained[1:] != shape[1:] and not self.any_size:
            valid = getattr(data.operator, "boundary", None) == "valid"
            raise DripError(f"the model was trained on images of shape {trained}, this file has "
                            f"{shape} (its filters are convolutional: --any-size uses it on "
                            f"images of another height and width"
                            + ("; with the valid blur boundary the images are larger than the "
                               "measurements by the PSF's size less one" if valid else "")
                            + ")", data.path)
        smallest, needs = self.smallest_side()
        if min(shape[1:]) < smallest:
            raise DripError(f"images of {shape[1]}x{shape[2]} pixels are smaller than the "
                            f"model's {needs} need ({smallest} pixels a side)", data.path)
        if self.info.operator_kind != data.operator.kind:
            warn(f"the model was trained for '{self.info.operator_kind}' and is used on "
                 f"'{data.operator.kind}' data (the regularizer is a prior and may transfer)")
        extra = {"model_sha256": self.sha256}
        if trained != shape:
            extra["model_image_shape"] = list(trained)
        if self.kind == "drip" and self.model.config.reweight:
            extra["reweight"] = self.model.config.reweight
            extra["edge_scale"] = self.model.config.edge_scale
        if self.kind == "drip" and self._patch_pass:
            extra["patch_weight"] = self.model.config.patch_weight
        return extra

    @property
    def widened(self) -> bool:
        """Whether :meth:`check` widened the model to the data's channels (``--each-channel``)."""
        return self.model is not self._loaded

    @property
    def _patch_pass(self) -> bool:
        return self.model.runs_patch_pass()

    def _model_for_channels(self, trained: int, shape: tuple, path):
        """The loaded model where the file has its channels, else its widening to the file's
        (``--each-channel``), or a refusal that says why."""
        if shape[0] == trained:
            return self._loaded
        widens = self.kind == "drip" and self._loaded.widens_per_channel
        if not (widens and self.each_channel):
            hint = (" (--each-channel uses this single-channel model on each channel)" if widens
                    else " (--each-channel serves single-channel drip models with the convex "
                    "regularizer)" if self.each_channel else "")
            raise DripError(f"the model was trained on {trained}-channel images, this file has "
                            f"{shape[0]} channels (shape {shape}){hint}", path)
        return per_channel_model(self._loaded, shape[0])

    def smallest_side(self) -> tuple[int, str]:
        """The smallest image side the model serves, and what sets it: its filters' reach, and
        the patch mixture's patches where its pass runs."""
        if self.kind == "drip" and self._patch_pass:
            from .regularizers.patches import PATCH_SIZE

            return (max(self.model.reach, PATCH_SIZE),
                    f"filters and {PATCH_SIZE}x{PATCH_SIZE} patches")
        return self.model.reach, "filters"

    def set_max_iterations(self, n: int) -> None:
        if self.kind == "unrolled":
            raise DripError("--max-iterations: the unrolled network runs its fixed number of "
                            "steps (set when it was trained with --layers)")
        self.model.config.max_iterations = n

    def set_reweight(self, passes: int | None, edge_scale: float | None = None) -> None:
        """Passes of edge-adaptive reweighting and their edge scale (``drip reconstruct
        --reweight --edge-scale``; ``None``: the model's)."""
        if self.kind == "unrolled":   # (an unrolled network has no solver config)
            raise DripError("--reweight and --edge-scale apply to drip models, not the unrolled "
                            "network")
        config = self.model.config
        if passes is not None:
            if passes and not self.model.regularizer.convex:
                raise DripError("--reweight needs a model with the convex regularizer (this one "
                                f"is {config.architecture})")
            config.reweight = passes
        if edge_scale is not None:
            if not config.reweight:
                raise DripError("--edge-scale applies with reweighting (--reweight K; this "
                                "model does not reweight by default)")
            config.edge_scale = require_setting_value("--edge-scale", "edge_scale", edge_scale)

    def set_patch_weight(self, weight: float) -> None:
        """The weight of the patch-mixture pass (``--patch-weight``; 0 skips the pass)."""
        has_mixture = self.kind == "drip" and self.model.has_patch_mixture
        if weight > 0 and not has_mixture:
            raise DripError("--patch-weight needs a drip model with a patch mixture (train one "
                            "with drip train --patch-components K)", self.path)
        if has_mixture:
            self.model.config.patch_weight = require_setting_value("--patch-weight",
                                                                   "patch_weight", weight)

    def solve(self, op, b, radius, progress=None):
        self.model.to(b.device)
        # drip: regularizer_value = R(z*) at the latent solution; unrolled: none
        try:
            result = self.model.solve(op, b, radius, progress=progress)
        except LINALG_FAILURES as exc:
            # (worded as drip train words the same failure)
            raise self._out_of_range(f"its solve failed ({str(exc).rstrip('.')})") from exc
        if not bool(torch.isfinite(result.solution).all()):
            raise self._out_of_range("its reconstruction holds NaN or Inf")
        return result

    def _out_of_range(self, what: str) -> DripError:
        """Finite weights can still overflow the arithmetic (a damaged file's 1e30): refused."""
        return DripError(f"the model's weights are out of range for this data: {what}",
                         self.path)


def warn_if_each_channel_unused(methods, channels: int, warn) -> None:
    """``--each-channel`` given, but no model among ``methods`` (checked against data of
    ``channels`` channels) needed it to serve them: each is for that many channels already, so
    none runs channel by channel. Said once, not per model: with several models the option may
    serve one and not another."""
    offered = [m for m in methods if getattr(m, "each_channel", False)]
    if channels > 1 and offered and not any(m.widened for m in offered):
        models = "the models are" if len(offered) > 1 else "the model is"
        warn(f"--each-channel: {models} for {channels}-channel images already and used as such")
