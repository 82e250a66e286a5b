"""Small float64 linear algebra on Python lists (Gram matrices of a few models).

Methods whose result is a combination ``sum_i c_i v_i`` of a few whole tensors work on
the coefficient vector ``c`` and the Gram matrix ``G[i][j] = <v_i, v_j>``: then
``<u, w> = c_u^T G c_w`` for any two such combinations. Sums use ``math.fsum``
(exactly rounded), so results do not depend on the order of the terms.
"""

from __future__ import annotations

import math


def matvec(g: list[list[float]], c: list[float]) -> list[float]:
    return [math.fsum(gij * cj for gij, cj in zip(row, c)) for row in g]


def quad(g: list[list[float]], a: list[float], b: list[float] | None = None) -> float:
    """``a^T G b`` (``b = a`` by default)."""
    b = a if b is None else b
    return math.fsum(ai * gij * bj for ai, row in zip(a, g) for gij, bj in zip(row, b))


def norm(g: list[list[float]], c: list[float]) -> float:
    """Norm of the combination with coefficients ``c`` (rounding cannot make it negative)."""
    return math.sqrt(max(0.0, quad(g, c)))
