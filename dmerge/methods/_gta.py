"""Generalized task arithmetic: the family of task_arithmetic, TIES, DARE, breadcrumbs, DELLA.

For every non-base model i (weight ``w_i``):

    tau_i = x_i - base
    tau_i = sparsify(tau_i)                 # keep-mask, see dmerge/methods/_sparsify.py
    tau_i = tau_i * l1(tau) / l1(kept)      # rescale: true (whole-tensor l1 norms)
    d_i   = w_i * tau_i

then, without sign consensus::

    out = base + lambda * sum_i d_i  [/ sum_i w_i   if normalize and |sum_i w_i| >= 1e-8]

and with TIES sign consensus (elect the sign of sum_i d_i, element by element; a
model contributes where its d_i has that sign, zero counts as no sign)::

    agree_i = sign(d_i) == (sum_j d_j >= 0 ? +1 : -1)
    out     = base + lambda * sum_i agree_i d_i  [/ sum_i agree_i w_i (0 -> 1)   if normalize]

A recipe with no non-base model gives the base. ``int8_mask`` only changes the dtype
of mergekit's mask tensor and is accepted without effect.
"""

from __future__ import annotations

from typing import Callable

from dmerge.lazy import torch

from dmerge import native
from dmerge.methods import ChunkInputs, Param, merge_method
from dmerge.methods._reduce import compute_dtype, row_blocks
from dmerge.methods.base import NONFINITE_OUTPUTS
from dmerge.methods._sparsify import ALL, NONE, Sparsifier, keep_bits_key, non_base_indices, rescale_statistic
from dmerge.numerics import round_to, widen

def gta_params(*, normalize: bool, rescale: bool) -> list[Param]:
    return [
        Param("normalize", kind=bool, default=normalize, doc="divide by the sum of (agreeing) weights"),
        Param("rescale", kind=bool, default=rescale,
              doc="scale each sparsified task vector back to its l1 norm over the whole tensor"),
        Param("lambda", default=1.0, doc="scale of the merged task vector"),
        Param("int8_mask", kind=bool, default=False, doc="accepted for compatibility; no effect"),
    ]


def gta_model_params(extra: tuple[Param, ...] = ()) -> list[Param]:
    return [
        Param("weight", required=True, for_base=False, doc="coefficient of this model's task vector"),
        Param("density", default=1.0, minimum=0.0, maximum=1.0, for_base=False,
              doc="fraction of the task vector kept"),
        *extra,
    ]


def merge_task_vectors(x: ChunkInputs, sparsifier: Sparsifier | None, consensus: bool) -> torch.Tensor:
    """The family's formula above, on one chunk, row block by row block (the inputs come
    as stored and are converted per block; everything stays small and cache-resident).

    Each block is rounded to ``x.out_dtype`` as soon as it is done, so no chunk-sized
    compute-dtype result exists."""
    idx = non_base_indices(x)
    dtype = compute_dtype(x)
    out_dtype = x.out_dtype or dtype
    if not idx:
        return round_to(widen(x.base, dtype), out_dtype)
    factors = x.stats.get("rescale") or {}
    weights = [x.model_params[i]["weight"] for i in idx]
    normalize, lam = x.params["normalize"], x.params["lambda"]
    total = sum(weights)
    out = torch.empty(x.base.shape, dtype=out_dtype, device=x.base.device)
    if _merge_native(x, idx, sparsifier, consensus, dtype, weights, total, factors, out):
        return out
    maskers = [sparsifier.masker(x, i) if sparsifier is not None else None for i in idx]
    flat_out = out.view(-1)
    at = 0
    with torch.no_grad():
        for xb in row_blocks(x):
            base = xb.base
            ds = []
            for i, masker, w in zip(idx, maskers, weights):
                d = xb.tensors[i] - base
                if masker is not None:
                    keep = masker(xb, d)
                    if keep is NONE:
                        d.zero_()
                    elif keep is not ALL:
                        d.mul_(keep)
                        if factors.get(i, 1.0) != 1.0:
                            d.mul_(factors[i])
                ds.append(d.mul_(w))
            mixed = _sum_in_order(ds)
            if consensus:
                _elect_and_merge(ds, weights, mixed, normalize)
            elif normalize and abs(total) >= 1e-8:  # as mergekit: a (near-)zero divisor is treated as 1
                mixed.div_(total)
            if lam != 1:
                mixed.mul_(lam)
            n = mixed.numel()
            flat_out[at: at + n] = round_to(mixed.add_(base).reshape(-1), out_dtype)
            at += n
    return out


def _merge_native(x: ChunkInputs, idx: list[int], sparsifier: Sparsifier | None, consensus: bool,
                  dtype: torch.dtype, weights: list[float], total: float, factors: dict, out: torch.Tensor) -> bool:
    """The same computation by the fused CPU kernel (:mod:`dmerge.native`), bit for bit;
    False (nothing done) where it does not apply: kernels unavailable, not float64
    compute, tensors off the CPU, or a mask only the torch path can make (DELLA)."""
    if dtype != torch.float64 or len(idx) > native.MAX_MODELS or not native.usable(out, *x.tensors):
        return False
    models = []
    for i, w in zip(idx, weights):
        plain = sparsifier.plain_mask(x, i) if sparsifier is not None else {"kind": ALL}
        if plain is None:
            return False
        m = native.Model(data=x.tensors[i].data_ptr(), dtype=native.dtype_codes()[x.tensors[i].dtype],
                         weight=float(w), factor=float(factors.get(i, 1.0)))
        kind = plain["kind"]
        if kind == ALL:
            m.mask = native.MASK_ALL
        elif kind == NONE:
            m.mask = native.MASK_NONE
        elif kind == "window":
            m.mask = native.MASK_WINDOW
            m.bottom, m.top = plain["bottom"], -1 if plain["top"] is None else plain["top"]
            m.lo, m.hi = plain["lo"], plain["hi"]
            ties = plain["ties"]
            if len(ties) > 2:
                return False
            m.n_ties = len(ties)
            for t, (key, first) in enumerate(ties):
                m.tie_key[t], m.tie_next[t] = key, first
        elif kind == "random":
            m.mask = native.MASK_RANDOM
            m.key, m.threshold = plain["key"], plain["threshold"]
            bits = x.scratch.get(keep_bits_key(x, i, plain))
            if bits is not None:  # drawn by the rescale statistic on these rows: not drawn again
                m.mask, m.keep_bits = native.MASK_BITS, bits.data_ptr()
        else:
            return False
        models.append(m)
    x.scratch[NONFINITE_OUTPUTS] = native.gta_merge(
        x.base, models, element_offset=x.element_offset, consensus=consensus, normalize=x.params["normalize"],
        total_weight=total, lam=x.params["lambda"], out=out)
    return True


def _sum_in_order(ds: list[torch.Tensor]) -> torch.Tensor:
    """d_0 + d_1 + ... (left to right) as a new tensor."""
    total = torch.add(ds[0], ds[1]) if len(ds) > 1 else ds[0].clone()
    for d in ds[2:]:
        total.add_(d)
    return total


def _elect_and_merge(ds: list[torch.Tensor], weights: list[float], mixed: torch.Tensor, normalize: bool) -> None:
    """TIES sign consensus on one block: ``mixed`` holds sum_i d_i on entry and
    sum_i agree_i d_i [/ sum_i agree_i w_i] on return; the d_i are consumed.

    The elected sign is sg = copysign(1, sum_i d_i) (-0.0 only arises when every term is
    zero, where the sign does not matter). Model i agrees where sg * d_i > 0, and
    sg * sum_i relu(sg * d_i) == sum_i agree_i d_i exactly. The divisor adds
    w_i * sign(relu(sg * d_i)), that is w_i * 1 or w_i * 0, in model order, as mergekit
    sums the agreeing weights (no boolean temporaries: they cost a conversion each).
    """
    sg = torch.copysign(torch.ones_like(mixed), mixed)
    divisor = None
    for k, (d, w) in enumerate(zip(ds, weights)):
        relu = d.mul_(sg).clamp_(min=0)
        if normalize:
            if divisor is None:
                divisor = torch.sign(relu).mul_(w)
            else:
                divisor.add_(torch.sign(relu), alpha=w)
        if k == 0:
            mixed.copy_(relu)
        else:
            mixed.add_(relu)
    mixed.mul_(sg)
    if divisor is not None:
        mixed.div_(divisor.add_(divisor == 0))  # no agreeing model: divide by 1


def register_gta(name: str, *, sparsifier: Sparsifier | None, consensus: bool, normalize: bool, rescale: bool,
                 reference: str, doc: str, extra_model_params: tuple[Param, ...] = (), work_tensors: int = 0,
                 check: Callable | None = None) -> Callable:
    """Register one member of the family as merge method ``name``."""
    statistics = []
    if sparsifier is not None:
        statistics = sparsifier.statistics() + [rescale_statistic(sparsifier)]

    def method(x: ChunkInputs) -> torch.Tensor:
        return merge_task_vectors(x, sparsifier, consensus)

    method.__doc__ = doc
    method.__name__ = name
    # work_tensors: none chunk-sized; the output is rounded block by block (merge_task_vectors)
    return merge_method(
        name,
        requires_base=True,
        params=gta_params(normalize=normalize, rescale=rescale),
        model_params=gta_model_params(extra_model_params),
        statistics=statistics,
        work_tensors=work_tensors,
        raw_inputs=True,
        check=check,
        reference=reference,
    )(method)
