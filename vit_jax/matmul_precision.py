"""Matmuls on rounded operands: `rounded_dot_general`, the encoder's `matmul_dtype` option.

This module owns a `dot_general` for Flax layers whose forward and backward matmuls round their
operands to a lower precision dtype (e.g. bfloat16) and accumulate in float32, through a custom
VJP so that the gradient matmuls are rounded too, and the operand layouts XLA:CPU multiplies in
bfloat16. It does not own which layers use it (`vit_jax.models_vit`, `matmul_dtype`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def rounded_dot_general(dtype: Any) -> Callable[..., jax.Array]:
    """A `dot_general` for Flax layers whose matmuls run on `dtype` operands (e.g. bfloat16).

    The forward matmul rounds both operands to `dtype` and returns the result in the usual
    dtype (float32 for float32 inputs), accumulated in float32. Its backward pass rounds the
    incoming gradient to `dtype` too, so the input- and weight-gradient matmuls also run on
    `dtype` operands, again with float32 results. Everything outside the matmuls (LayerNorm,
    softmax, GELU, residuals) stays in the compute dtype. `precision` is not used: the rounding
    is the precision.
    """
    dtype = jnp.dtype(dtype)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision
        out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
        (lc, rc), (lb, rb) = dimension_numbers
        dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))  # hashable, for custom_vjp
        return _rounded_dot(lhs, rhs, dims, (dtype, out_dtype, lhs.dtype, rhs.dtype))

    return dot_general


def _product(a, b, a_contract, b_contract, a_batch, b_batch, out_dtype):
    """`dot_general(a, b)` of rounded operands, accumulated in `out_dtype`.

    The result's axes are the usual ones: batch, the free axes of `a`, the free axes of `b`.
    XLA:CPU multiplies bfloat16 operands into float32 fast (and at all) only when they are laid
    out as (batch, free, contracting) on the left and (batch, contracting, free) or (batch,
    free, contracting) on the right. Any other layout (a weight gradient, which contracts the
    token axis; Flax's attention einsums, whose batch axes are not leading) is multiplied in
    float32: the rounded values convert exactly, so it is the same product at float32 speed.
    """
    a_free = _free_axes(a.ndim, a_contract, a_batch)
    b_free = _free_axes(b.ndim, b_contract, b_batch)
    b_rest = list(range(len(b_batch), b.ndim))
    canonical = (
        [*a_batch, *a_free, *a_contract] == list(range(a.ndim))
        and list(b_batch) == list(range(len(b_batch)))
        and b_rest in ([*b_contract, *b_free], [*b_free, *b_contract])
        and list(b_contract) == sorted(b_contract)
    )
    if not canonical:
        a, b = a.astype(out_dtype), b.astype(out_dtype)
    dims = ((tuple(a_contract), tuple(b_contract)), (tuple(a_batch), tuple(b_batch)))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)


def _free_axes(ndim: int, contract: tuple, batch: tuple) -> list[int]:
    return [d for d in range(ndim) if d not in contract and d not in batch]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rounded_dot(lhs, rhs, dims, dtypes):
    """dtypes: (the rounding dtype, the result's, lhs's, rhs's)."""
    return _rounded_dot_fwd(lhs, rhs, dims, dtypes)[0]


def _rounded_dot_fwd(lhs, rhs, dims, dtypes):
    dtype, out_dtype, _, _ = dtypes
    lhs_rounded, rhs_rounded = lhs.astype(dtype), rhs.astype(dtype)
    (lc, rc), (lb, rb) = dims
    out = _product(lhs_rounded, rhs_rounded, lc, rc, lb, rb, out_dtype)
    return out, (lhs_rounded, rhs_rounded)


def _rounded_dot_bwd(dims, dtypes, residuals, grad):
    """The two gradient matmuls, each with the rounded gradient as the left operand.

    The output's axes are (batch, lhs free, rhs free). d_lhs contracts the gradient's rhs-free
    axes with rhs's free axes, leaving (batch, lhs free, rhs contracting) — rhs's contracting
    axes pair with lhs's — which is then permuted into lhs's axis order; d_rhs likewise.
    """
    dtype, _, lhs_dtype, rhs_dtype = dtypes
    lhs, rhs = residuals
    (lc, rc), (lb, rb) = dims
    grad = grad.astype(dtype)
    lf, rf = _free_axes(lhs.ndim, lc, lb), _free_axes(rhs.ndim, rc, rb)
    batch = tuple(range(len(lb)))
    lhs_free_in_out = tuple(range(len(lb), len(lb) + len(lf)))
    rhs_free_in_out = tuple(range(len(lb) + len(lf), grad.ndim))

    d_lhs = _product(grad, rhs, rhs_free_in_out, rf, batch, rb, lhs_dtype)
    lhs_axes = [*lb, *lf, *(lc[rc.index(r)] for r in sorted(rc))]  # the axes d_lhs has
    d_rhs = _product(grad, lhs, lhs_free_in_out, lf, batch, lb, rhs_dtype)
    rhs_axes = [*rb, *rf, *(rc[lc.index(a)] for a in sorted(lc))]
    return (
        jnp.transpose(d_lhs, sorted(range(lhs.ndim), key=lhs_axes.__getitem__)),
        jnp.transpose(d_rhs, sorted(range(rhs.ndim), key=rhs_axes.__getitem__)),
    )


_rounded_dot.defvjp(_rounded_dot_fwd, _rounded_dot_bwd)
