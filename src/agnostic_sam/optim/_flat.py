"""The flat fast path: a step's per-parameter lists packed into one contiguous buffer, so that a
global norm or a scaling costs a few kernels instead of one per parameter tensor.

A `Layout` caches, for one structure of param groups, the parameters in order, their groups,
and a packing order: parameters sorted by size (stable), so that the tensors of equal numel are
rows of one ``(count, numel)`` block. A packed list (`Packed`) is a list of views of such a
buffer, in parameter order, usable wherever a list of tensors is: theta, copied with one foreach
copy into a buffer of a pool kept with the layout (allocated once; valid until the next step
begins). Norms of other lists go through a scratch buffer that is never handed out.

Same bits as the per-tensor path: a row norm of a block equals the norm of that tensor alone
(the same reduction over the same contiguous numbers), the norms are put back in parameter order
before the norm of norms, and element-wise products are element-wise products. The fast path is
taken on the CPU for float32/float64 dense tensors on one device (on accelerators the foreach
kernels already fuse per-tensor work; other dtypes keep their reduction as it was).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from agnostic_sam.optim import _functional as F

__all__ = ["Checked", "Layout", "Packed", "checked", "dot", "global_norm", "layout_key",
           "ascend", "from_theta", "norm", "perturb",
           "snapshot"]

_DTYPES = (torch.float32, torch.float64)


def layout_key(param_groups: list[dict[str, Any]]) -> tuple[Any, ...]:
    """What a `Layout` depends on: the group list and each group's parameter list (identity and
    length). Cheap: per group, not per parameter."""
    return (id(param_groups),) + tuple((id(g["params"]), len(g["params"])) for g in param_groups)


class Packed(list):  # type: ignore[type-arg]
    """Views (in parameter order) of one flat buffer `flat` packed by `layout`."""

    flat: Tensor
    layout: Layout
    views: tuple[Tensor, ...]
    blocks: tuple[Tensor, ...]  # per block of the layout's stack plan: its rows, shaped

    def of(self, layout: Layout) -> bool:
        """Packed by `layout`, and every element still the view it was (none replaced)."""
        return (self.layout is layout and len(self) == len(self.views)
                and all(a is b for a, b in zip(self, self.views)))


class Checked(list):  # type: ignore[type-arg]
    """The gradients of `layout`'s parameters, every one present and dense (read from p.grad,
    so of their parameters' shape and dtype): the fast path applies without a check."""

    layout: Layout


class Layout:
    """Parameters and groups in order, and the packing order of the flat fast path."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.key = layout_key(param_groups)
        self.params: list[Tensor] = []
        self.groups: list[dict[str, Any]] = []
        for group in param_groups:
            for p in group["params"]:
                self.params.append(p)
                self.groups.append(group)
        self.single_group = len(param_groups) == 1
        # Where a norm of no gradient lives (as `_zero_like_norm` puts it).
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.dtype = self.params[0].dtype if self.params else torch.get_default_dtype()
        # Per group: (group, indices of its parameters, or None for all of them).
        by_group: dict[int, tuple[dict[str, Any], list[int]]] = {}
        for i, g in enumerate(self.groups):
            by_group.setdefault(id(g), (g, []))[1].append(i)
        self.by_group: list[tuple[dict[str, Any], list[int] | None]] = [
            (g, None if len(by_group) == 1 else idx) for g, idx in by_group.values()
        ]
        self.batchnorms: tuple[Any, list[Any]] | None = None  # (model, its BatchNorm layers)
        first = self.params[0] if self.params else None
        self.fast = first is not None and all(
            p.device == first.device and p.dtype == first.dtype and p.layout == torch.strided
            for p in self.params
        ) and first.device.type == "cpu" and first.dtype in _DTYPES
        self.pool: list[Packed] = []
        self.free: list[Packed] = []
        self.scratch: list[Packed] = []
        if not self.fast:
            return
        n = len(self.params)
        self.order = sorted(range(n), key=lambda i: self.params[i].numel())
        position = [0] * n  # position[i]: row of parameter i in the packed order
        for row, i in enumerate(self.order):
            position[i] = row
        self.position = position
        self.gather = torch.tensor(position, dtype=torch.long)  # parameter order from packed
        self.ungather = torch.tensor(self.order, dtype=torch.long)  # packed order from parameter
        # Blocks of equal numel: (offset into flat, rows, numel).
        self.blocks: list[tuple[int, int, int]] = []
        offset = 0
        sizes = [self.params[i].numel() for i in self.order]
        start = 0
        while start < n:
            end = start
            while end < n and sizes[end] == sizes[start]:
                end += 1
            self.blocks.append((offset, end - start, sizes[start]))
            offset += (end - start) * sizes[start]
            start = end
        self.shapes = [p.shape for p in self.params]
        # Per block: the parameter indices of its rows and their common shape, so that a list is
        # packed with one torch.stack per block (2-3x faster than a foreach copy of 242 small
        # tensors); None when a block mixes shapes of one numel (then the foreach copy).
        plan: list[tuple[list[int], Any]] = []
        row = 0
        for _, rows, _ in self.blocks:
            idx = self.order[row:row + rows]
            row += rows
            plan.append((idx, self.shapes[idx[0]]))
        same = all(self.shapes[i] == shape for idx, shape in plan for i in idx)
        self.stack_plan: list[tuple[list[int], Any]] | None = plan if same else None
        # Row (packed order) -> index of its group among the distinct groups (per-group radii).
        distinct: dict[int, int] = {}
        for g in self.groups:
            distinct.setdefault(id(g), len(distinct))
        self.group_list = list({id(g): g for g in self.groups}.values())
        self.row_group = torch.tensor([distinct[id(self.groups[i])] for i in self.order])
        self.total = sum(p.numel() for p in self.params)

    def matches(self, params: list[Tensor]) -> bool:
        """`params` is this layout's parameter list, element for element."""
        mine = self.params
        if params is mine:
            return True
        return len(params) == len(mine) and all(a is b for a, b in zip(params, mine))

    def accepts(self, tensors: Sequence[Tensor | None]) -> bool:
        """The fast path applies to `tensors` (aligned with the parameters): every one present,
        dense, of the parameters' dtype and shape."""
        if not self.fast or len(tensors) != len(self.params):
            return False
        if isinstance(tensors, Checked) and tensors.layout is self:
            return True
        if isinstance(tensors, Packed) and tensors.of(self):
            return True
        dtype = self.params[0].dtype
        if not all(t is not None and t.layout is torch.strided and t.dtype is dtype
                   for t in tensors):
            return False
        return [t.shape for t in tensors] == self.shapes  # type: ignore[union-attr]

    def _buffer(self) -> Packed:
        """A flat buffer and its views (in parameter order), allocated once and reused."""
        ordered = [self.params[i] for i in self.order]
        flat = ordered[0].new_empty(self.total)
        views = torch._C._nn.unflatten_dense_tensors(flat, ordered)
        out = Packed(views[r] for r in self.position)
        out.flat, out.layout, out.views = flat, self, tuple(out)
        out.blocks = tuple(
            flat[o:o + rows * size].view(rows, *shape)
            for (o, rows, size), (_, shape) in zip(self.blocks, self.stack_plan or ()))
        return out

    def fill(self, out: Packed, tensors: list[Tensor]) -> None:
        """Copy `tensors` (aligned with the parameters, of their shapes) into buffer `out`: one
        torch.stack per block of equal shape, else one foreach copy; the same values either
        way (a copy)."""
        if self.stack_plan is None:
            torch._foreach_copy_(list(out.views), tensors)
            return
        with torch.no_grad():  # the parameters themselves may be packed (theta)
            for (idx, _), block in zip(self.stack_plan, out.blocks):
                torch.stack([tensors[i] for i in idx], out=block)

    def begin(self) -> None:
        """A new step: every buffer of the pool is free again."""
        self.free = list(self.pool)

    def pack(self, tensors: list[Tensor]) -> Packed:
        """A copy of `tensors` (aligned with the parameters) in a buffer of the pool, valid until
        it is released (`release`) or the next step begins. No allocation after the first
        steps: the pool holds as many buffers as a step has alive at once."""
        if self.free:
            out = self.free.pop(0)
        else:
            out = self._buffer()
            self.pool.append(out)
        self.fill(out, tensors)
        return out

    def slot(self, slot: int) -> Packed:
        """Scratch buffer `slot` (never handed out)."""
        while len(self.scratch) <= slot:
            self.scratch.append(self._buffer())
        return self.scratch[slot]

    def scale_by_group(self, flat: Tensor, factors: list[Tensor]) -> None:
        """flat <- flat * factors[group of the row], `factors` a 0-d tensor per distinct group
        (in `group_list` order): each element times the same float as a per-tensor mul_."""
        if len(factors) == 1:
            flat.mul_(factors[0])
            return
        per_row = torch.stack(factors).index_select(0, self.row_group)
        row = 0
        for o, rows, size in self.blocks:
            flat[o:o + rows * size].view(rows, size).mul_(per_row[row:row + rows].unsqueeze(1))
            row += rows

    def flat_of(self, tensors: list[Tensor], slot: int = 0) -> Tensor:
        """The flat buffer of `tensors`: its own when packed by this layout, else a copy in
        scratch buffer `slot` (read at once; never handed out)."""
        if isinstance(tensors, Packed) and tensors.of(self):
            return tensors.flat
        buffer = self.slot(slot)
        self.fill(buffer, tensors)
        return buffer.flat

    def norms(self, flat: Tensor) -> Tensor:
        """The 2-norm of every tensor packed in `flat`, in parameter order: shape (n,)."""
        parts = [
            torch.linalg.vector_norm(flat[o:o + rows * size].view(rows, size), dim=1)
            for o, rows, size in self.blocks
        ]
        return torch.cat(parts).index_select(0, self.gather)



# ---- the fast paths of SharpnessOptimizer's step pieces (same bits as the list paths) ---------


def snapshot(layout: Layout, params: list[Tensor]) -> list[Tensor] | None:
    """theta: a copy of `params` in a pool buffer (valid until the next step begins), or None
    when the fast path does not apply."""
    if not (layout.fast and layout.matches(params)):
        return None
    return layout.pack(params)


def checked(layout: Layout, params: list[Tensor], grads: list[Any]) -> list[Any]:
    """`grads` (read from p.grad of `params`) marked `Checked` when the fast path applies."""
    if not (layout.fast and layout.matches(params)
            and all(g is not None and not g.is_sparse for g in grads)):
        return grads
    out = Checked(grads)
    out.layout = layout
    return out


def global_norm(layout: Layout, tensors: list[Tensor], foreach: bool,
                weights: list[Tensor] | None = None) -> Tensor:
    """`_functional.global_norm`, bit for bit, with a few kernels when `layout` packs them (one
    foreach copy into a scratch buffer, one row norm per block of equal numel)."""
    if not (layout.accepts(tensors) and (weights is None or layout.accepts(weights))):
        return F.global_norm(tensors, foreach, weights)
    flat = layout.flat_of(tensors)
    if weights is not None:
        flat = layout.flat_of(weights, 1) * flat  # ||T g|| = ||theta * g||, element by element
    return torch.linalg.vector_norm(layout.norms(flat))


def dot(layout: Layout, a: list[Tensor | None], b: list[Tensor | None], like: Tensor) -> Tensor:
    """<a, b> over the parameters where both have a gradient (0 like `like` where none). When
    every one has, one kernel over flat copies (the order of the sum differs from
    `_functional.dot`'s: a float64 parity test keeps them within 1e-12)."""
    if layout.accepts(a) and layout.accepts(b):
        return torch.dot(layout.flat_of(a), layout.flat_of(b, 1))  # type: ignore[arg-type]
    both = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if not both:
        return like * 0
    return F.dot([x for x, _ in both], [y for _, y in both])


def norm(layout: Layout, grads: list[Tensor | None], theta: list[Tensor] | None,
         foreach: bool) -> Tensor:
    """||T g|| over the parameters that have a gradient: T = |theta| when `theta` is given
    (adaptive), else 1; 0 when none has one."""
    if isinstance(grads, Checked) and grads.layout is layout:  # every one present
        return global_norm(layout, grads, foreach, theta)
    idx = [i for i, g in enumerate(grads) if g is not None]
    if not idx:
        return torch.zeros((), device=layout.device, dtype=layout.dtype)
    if len(idx) == len(grads):  # every one: the lists as they are (a marked list stays marked)
        return global_norm(layout, grads, foreach, theta)  # type: ignore[arg-type]
    weights = [theta[i] for i in idx] if theta is not None else None
    return global_norm(layout, [grads[i] for i in idx], foreach, weights)  # type: ignore[misc]


def _pick(xs: list[Any], idx: list[int] | None) -> list[Any]:
    return xs if idx is None else [xs[i] for i in idx]


def perturb(layout: Layout, params: list[Tensor], grads: list[Tensor | None],
            theta: list[Tensor] | None, groups: list[dict[str, Any]], key: str, sign: float,
            denom: Tensor, foreach: bool) -> None:
    """params += sign * rho_group * T^2 g / denom group by group (the radius is per group, the
    norm in `denom` global), consuming `grads`; T = |theta| when `theta` is given. Lists aligned
    with `params`; a parameter whose gradient is None is not touched."""
    if isinstance(grads, Checked) and grads.layout is layout and groups is layout.groups:
        by_group = layout.by_group  # every parameter has a gradient: cached index lists
    else:
        found: dict[int, tuple[dict[str, Any], list[int]]] = {}
        for i, (g, group) in enumerate(zip(grads, groups)):
            if g is not None:
                found.setdefault(id(group), (group, []))[1].append(i)
        by_group = list(found.values())  # type: ignore[arg-type]
    for group, idx in by_group:
        F.perturb_(_pick(params, idx), _pick(grads, idx),
                   _pick(theta, idx) if theta is not None else None,
                   sign * group[key], denom, foreach)


def from_theta(layout: Layout, params: list[Tensor], theta: list[Tensor],
               groups: list[dict[str, Any]], terms: list[tuple[Any, str, float, Tensor]],
               adaptive: bool) -> bool:
    """params <- theta + sum_k sign_k rho_k T^2 g_k / denom_k for `terms` = [(g_k, key_k,
    sign_k, denom_k)], where params == theta bit for bit on entry: in flat buffers, with the
    rounding of `perturb` term by term (each term rounded, then added in order), and one copy
    into the parameters instead of a multiply and an add per tensor and term. False (nothing
    done) when the fast path does not apply."""
    if not (isinstance(theta, Packed) and theta.of(layout) and groups is layout.groups
            and layout.matches(params)):
        return False
    if not all(isinstance(g, Checked) and g.layout is layout for g, *_ in terms):
        return False
    total = layout.slot(1)
    for k, (grads, key, sign, denom) in enumerate(terms):
        g = layout.flat_of(grads, 0)  # a copy: the gradients themselves are left as they were
        if adaptive:
            g.mul_(theta.flat).mul_(theta.flat)
        layout.scale_by_group(g, [(sign * group[key]) / denom for group in layout.group_list])
        if k == 0:
            torch.add(theta.flat, g, out=total.flat)
        else:
            total.flat.add_(g)
    torch._foreach_copy_(params, list(total.views))
    return True


def ascend(layout: Layout, params: list[Tensor], theta: list[Tensor], grads: list[Any],
           groups: list[dict[str, Any]], key: str, eps: float,
           weights: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor] | None:
    """`SharpnessOptimizer._ascend_from_theta` from one flat copy of `grads`: (||T g||, ||g||)
    and params <- theta + rho T^2 g / (||T g|| + eps), with T = ``weights(theta's flat
    buffer)`` (Adaptive-SAM: theta itself; Kwon et al.'s ASAM: |theta| + eta) or 1 when None;
    None (nothing done) when the fast path does not apply."""
    if not (isinstance(theta, Packed) and theta.of(layout) and groups is layout.groups
            and layout.matches(params) and isinstance(grads, Checked) and grads.layout is layout):
        return None
    g = layout.flat_of(grads, 0)
    plain = torch.linalg.vector_norm(layout.norms(g))
    t = weights(theta.flat) if weights is not None else None
    norm = torch.linalg.vector_norm(layout.norms(t * g)) if t is not None else plain
    if t is not None:
        g.mul_(t).mul_(t)
    denom = norm + eps
    layout.scale_by_group(g, [(1.0 * group[key]) / denom for group in layout.group_list])
    total = layout.slot(1)
    torch.add(theta.flat, g, out=total.flat)
    torch._foreach_copy_(params, list(total.views))
    return norm, plain
