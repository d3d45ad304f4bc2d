"""Random weight perturbation (Li et al., "Efficient Generalization Improvement Guided by Random
Weight Perturbation", 2022; m-RWP: "Revisiting Random Weight Perturbation for Efficiently
Improving Generalization", TMLR 2024)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from agnostic_sam.amp import LossScaler
from agnostic_sam.optim import _flat
from agnostic_sam.optim._base import Closure, SharpnessOptimizer
from agnostic_sam.optim._settings import Setting

__all__ = ["RWP", "row_norms"]


def row_norms(w: Tensor) -> Tensor:
    """||W_i|| per output row, shaped to broadcast against ``w`` ((out, 1, ...) for a tensor of
    2 or more dimensions); ||W|| (0-d) for a 1-D or 0-d tensor."""
    if w.dim() < 2:
        return w.norm()
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))


class RWP(SharpnessOptimizer):
    r"""Mixed random weight perturbation (m-RWP), wrapping any `torch.optim` optimizer.

    Each step runs the closure twice on the same mini-batch B, with g(.) = grad L_B(.):

    1. at theta:            g = g(theta)
    2. at theta + z:        g_z = g(theta + z),  z_i ~ N(0, (sigma ||W_i||)^2) per output row i
                            of each tensor W of 2+ dimensions, z ~ N(0, (sigma ||W||)^2) for a
                            1-D (or 0-d) tensor (Eq. 6 of the TMLR paper: filter-wise scale)

    then restores theta bit for bit and lets the base optimizer step with

        d = lmbda g_z + (1 - lmbda) g                                  (m-RWP's mixed gradient)

    The authors compute g and g_z on two different batches (or on two GPUs in parallel); here
    both are on the step's batch, so a step needs one batch like SAM. The two passes are
    independent of each other, and both synchronize under DDP (both enter the step).

    The noise comes from a ``torch.Generator`` the optimizer owns, seeded with ``seed`` and
    created on the first parameter's device at the first step; its state travels in
    ``state_dict()`` under ``"rwp_generator"``, so a resumed run draws the same noise. Order of
    the draws: per step, after pass 1, one ``torch.randn(p.shape, dtype=p.dtype)`` per parameter
    with a gradient in pass 1, in param-group order; z = sigma ||W_i|| randn (sigma of the
    parameter's group, norms at theta). Parameters without a gradient are not perturbed.
    ``sigma`` lives in the param groups; ``sigma = 0`` gives the base optimizer's step.
    Two parameter-sized buffers (theta and g) live during a step.
    """

    SETTINGS = (
        Setting("sigma", float, 0.015, "noise scale relative to each row's norm", low=0.0,
                grid=(0.005, 0.01, 0.02, 0.04), per_group=True),
        Setting("lmbda", float, 0.5, "weight of the perturbed gradient in the mix", low=0.0,
                high=1.0),
    )
    _radius_keys = ("sigma",)
    _num_buffers = 2
    _pass_names = ("at theta", "at theta + z")

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        sigma: float = 0.015,
        lmbda: float = 0.5,
        seed: int = 0,
        perturb_eps: float = 1e-12,
        model: nn.Module | None = None,
        perturbation: str = "local",
        loss_scaler: LossScaler | None = None,
        check_finite: bool = True,
        perturb_foreach: bool | None = None,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.lmbda = self.SETTINGS[1].check(lmbda)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"invalid seed={seed!r}: must be an int")
        self.seed = seed
        super().__init__(
            params, base_optimizer, {"sigma": sigma}, adaptive=False, perturb_eps=perturb_eps,
            model=model, perturbation=perturbation, loss_scaler=loss_scaler,
            check_finite=check_finite, perturb_foreach=perturb_foreach,
            max_grad_norm=max_grad_norm, base_kwargs=base_kwargs,
        )
        self._generator: torch.Generator | None = None  # made at the first step
        self._generator_state: Tensor | None = None  # a loaded state, for the first step
        self._g: list[Tensor | None] | None = None  # g(theta), during a step only

    # ---- the generator and its state -----------------------------------------------------

    def _gen(self, device: torch.device) -> torch.Generator:
        gen = self._generator
        if gen is not None and gen.device.type == device.type:
            return gen
        if gen is not None:
            raise RuntimeError(f"RWP's noise generator is on {gen.device}, the parameters moved "
                               f"to {device}: build the optimizer after moving the model")
        gen = torch.Generator(device=device).manual_seed(self.seed)
        if self._generator_state is not None:
            try:
                gen.set_state(self._generator_state)
            except RuntimeError:
                raise ValueError(f"the saved RWP generator state is not of a {device.type} "
                                 "generator: resume on the device type the run was saved on"
                                 ) from None
            self._generator_state = None
        self._generator = gen
        return gen

    def _state_dict(self) -> dict[str, Any]:
        state = super()._state_dict()
        # None before the first step: the next step seeds a fresh generator with `seed`.
        gen = self._generator
        state["rwp_generator"] = gen.get_state() if gen is not None else self._generator_state
        return state

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("rwp_generator", None)
        super()._load_state_dict(state_dict)
        self._generator = None
        self._generator_state = None if saved is None else saved.clone()

    # ---- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, grad_scaler: Any = None) -> Tensor:  # type: ignore[override]
        """One m-RWP step; returns the loss at theta, detached."""
        if not callable(closure):
            raise TypeError("RWP.step(closure) needs a closure that runs forward and backward on "
                            "the mini-batch and returns the loss")
        with self._stepping(grad_scaler):
            params, groups = self._params()
            foreach = self._use_foreach(params)
            if self._present_gradients(params):
                raise RuntimeError("RWP found gradients in p.grad at step entry: call "
                                   "opt.zero_grad() before, and backward only inside the closure")
            # g(theta) enters the step: this pass synchronizes under DDP like the final one.
            loss = self._run(closure, params, at_theta=True, final=True)
            grads = self._grads(params, foreach, take=True)
            theta = self._snapshot(params, foreach)
            norm = self._norm(grads, theta, foreach)
            check = [norm]
            self._g = grads
            try:
                with self._restore_on_error(params, theta, foreach):
                    self._add_noise(params, grads, groups, theta)
                    self._final_pass(closure, params, check, foreach)
            finally:
                self._g = None
            self.stats = {"loss_train": loss, "grad_norm_train": norm}
            self._finish(params, theta, check, self._pass_names, foreach)
        return loss

    def _add_noise(self, params: list[Tensor], grads: list[Tensor | None],
                   groups: list[dict[str, Any]], theta: list[Tensor]) -> None:
        """params += z, z = sigma ||W_i|| randn(p.shape), in the documented order."""
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            return
        gen = self._gen(params[present[0]].device)
        if self._add_noise_flat(params, grads, groups, theta, gen):
            return
        for i in present:
            p = params[i]
            z = torch.randn(p.shape, generator=gen, dtype=p.dtype, device=gen.device)
            z = z.to(p.device).mul_(row_norms(p).mul_(groups[i]["sigma"]))
            p.add_(z)

    def _transform_final(self, params: list[Tensor], foreach: bool) -> None:
        """p.grad = g_z  ->  d = lmbda g_z + (1 - lmbda) g (a missing gradient counts as 0)."""
        g = self._g
        if g is None:
            return
        lmbda = self.lmbda
        final = [p.grad for p in params]
        if isinstance(g, _flat.Checked) and all(d is not None for d in final):
            # every gradient present: the loop's two operations, each as one multi-tensor op
            torch._foreach_mul_(final, lmbda)  # type: ignore[arg-type]
            torch._foreach_add_(final, g, alpha=1.0 - lmbda)  # type: ignore[arg-type]
            return
        for p, gt in zip(params, g):
            if gt is None:
                if p.grad is not None:
                    p.grad.mul_(lmbda)
            elif p.grad is None:
                p.grad = gt.mul_(1.0 - lmbda)
            else:
                p.grad.mul_(lmbda).add_(gt, alpha=1.0 - lmbda)

    def _add_noise_flat(self, params: list[Tensor], grads: list[Tensor | None],
                        groups: list[dict[str, Any]], theta: list[Tensor],
                        gen: torch.Generator) -> bool:
        """`_add_noise` on the flat buffers of `_flat` when they apply (every gradient present,
        theta packed: CPU float32/float64), else False (nothing drawn). The same draws in the
        same order (each into its slot of a flat buffer) and the same bits: a 1-D tensor's scale
        sigma ||W|| is the row norm of its packed block times sigma, a tensor of 2+ dimensions
        keeps its per-row scale (and is multiplied by exactly 1 with the others), and the
        parameters are at theta (p + z = theta + z, one copy back)."""
        layout = self._layout()
        if not (isinstance(grads, _flat.Checked) and grads.layout is layout
                and isinstance(theta, _flat.Packed) and theta.of(layout)
                and groups is layout.groups and gen.device == layout.device):
            return False
        z = layout.slot(0)
        for p, view in zip(params, z):
            torch.randn(p.shape, generator=gen, dtype=p.dtype, out=view)
        wide = [i for i, p in enumerate(params) if p.dim() >= 2]
        for i in wide:  # sigma ||W_i|| per output row
            z[i].mul_(row_norms(params[i]).mul_(groups[i]["sigma"]))
        norms = layout.norms(theta.flat)  # ||W|| of every tensor, in parameter order
        if layout.single_group:
            scale = norms.mul_(groups[0]["sigma"])
        else:
            scale = norms.mul_(torch.tensor([g["sigma"] for g in groups], dtype=norms.dtype))
        if wide:
            scale[wide] = 1.0  # scaled per row above
        scale = scale.index_select(0, layout.ungather)  # packed order
        row = 0
        for o, rows, size in layout.blocks:
            z.flat[o:o + rows * size].view(rows, size).mul_(scale[row:row + rows].unsqueeze(1))
            row += rows
        total = layout.slot(1)
        torch.add(theta.flat, z.flat, out=total.flat)
        torch._foreach_copy_(params, list(total.views))
        return True
