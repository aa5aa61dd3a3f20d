"""Fixed-point (integer) requantization, as in gemmlowp / TFLite: the math only, no graph surgery.

An integer conv or matmul leaves an int32 accumulator `acc` whose real value is
`acc * s_x * s_w` (per output channel c). Quantizing it to the output's (s_y, z_y) is

    q = clamp(round(acc * M_c) + z_y, qmin, qmax),    M_c = s_x * s_w_c / s_y

Instead of a float multiply, M_c is written as `m_c * 2^-(31 + shift_c)` with the int32
multiplier m_c in [2^30, 2^31) (31 significant bits), and

    round(acc * M_c) = (acc * m_c + 2^(total - 1)) >> total,    total = 31 + shift_c

in int64: |acc| <= 2^31 and m_c < 2^31, so the product and the rounding term stay below
2^63. `>>` is the arithmetic shift, so the rounding is half up (ties go towards +inf);
away from ties it is exactly round-to-nearest of the real product, and M_c itself is
within 2^-31 relative of the float multiplier, so the result is within one output step of
the float requantization (and equal to it except at ties or within ~2^-31 of one).

`quantize_multiplier` (numpy) makes (m, shift); `requantize_reference` is the numpy
reference of the integer formula; `requantize_relax` emits the same formula as Relax ops.
"""
from __future__ import annotations

import numpy as np

MAX_TOTAL_SHIFT = 62  # (acc * m) >> 62 with |acc * m| < 2^62 is 0 or -1 before rounding


def quantize_multiplier(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """float multipliers M (> 0) -> (int64 m in [2^30, 2^31), int64 shift) with M ~= m * 2^-(31 + shift).

    A multiplier so small that every int32 accumulator rounds to 0 (total shift > 62) gets
    m = 0 and the largest shift; M >= 2^30 (never seen in requantization) is refused.
    """
    values = np.asarray(multiplier, dtype=np.float64)
    if np.any(~np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"requantization multipliers must be finite and >= 0, got {values}")
    if np.any(values >= 2.0 ** 30):
        raise ValueError(f"requantization multiplier too large for a 31-bit fixed-point form: {values.max()}")
    mantissa, exponent = np.frexp(values)            # values = mantissa * 2^exponent, mantissa in [0.5, 1)
    m = np.round(mantissa * 2.0 ** 31).astype(np.int64)
    carry = m == 2 ** 31                              # the mantissa rounded up to 1.0
    m = np.where(carry, 2 ** 30, m)
    exponent = np.where(carry, exponent + 1, exponent).astype(np.int64)
    shift = -exponent                                 # values = m * 2^-31 * 2^exponent
    tiny = (31 + shift > MAX_TOTAL_SHIFT) | (values == 0)
    m = np.where(tiny, 0, m)
    shift = np.where(tiny, MAX_TOTAL_SHIFT - 31, shift)
    return m.astype(np.int64), shift.astype(np.int64)


def rounding_terms(shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(total right shift, the 2^(total-1) rounding term) per channel, int64."""
    total = (31 + np.asarray(shift, dtype=np.int64)).astype(np.int64)
    return total, (np.int64(1) << (total - 1)).astype(np.int64)


def qrange(dtype: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def requantize_reference(acc, m, shift, zero: int, dtype: str = "uint8") -> np.ndarray:
    """numpy: clamp(((acc * m + 2^(total-1)) >> total) + zero) in `dtype` (m, shift broadcast against acc)."""
    total, rounding = rounding_terms(shift)
    scaled = (np.asarray(acc, dtype=np.int64) * np.asarray(m, dtype=np.int64) + rounding) >> total
    lo, hi = qrange(dtype)
    return np.clip(scaled + int(zero), lo, hi).astype(dtype)


def requantize_float(acc, multiplier, zero: int, dtype: str = "uint8") -> np.ndarray:
    """The float path the QDQ graph spells: clamp(round_half_even(acc * M) + zero)."""
    lo, hi = qrange(dtype)
    return np.clip(np.round(np.asarray(acc, np.float64) * multiplier) + int(zero), lo, hi).astype(dtype)


def requantize_relax(acc, m: np.ndarray, shift: np.ndarray, zero: int, dtype: str = "uint8"):
    """The Relax expression of `requantize_reference` for an int32 `acc`.

    m and shift must already have a shape that broadcasts against acc in its layout
    (e.g. (1, C, 1, 1) for NCHW, (1, C/16, 1, 1, 16) for NCHW16c). Elementwise only, so
    FuseOps folds it into the conv's or matmul's epilogue.
    """
    from tvm import relax

    total, rounding = rounding_terms(shift)
    lo, hi = qrange(dtype)
    x = relax.op.astype(acc, "int64")
    def i64(value):  # relax.const would narrow an int64 array to int32
        return relax.const(np.asarray(value, np.int64), "int64")

    x = relax.op.add(relax.op.multiply(x, i64(m)), i64(rounding))
    x = relax.op.right_shift(x, i64(total))
    x = relax.op.minimum(relax.op.maximum(relax.op.add(x, i64(zero)), i64(lo)), i64(hi))
    return relax.op.astype(x, dtype)
