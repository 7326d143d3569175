"""Polynomials over GF(65497) that map activation indices to 16-bit values.

A TOPLOC proof stores the top-k activations of a chunk as the one polynomial of degree < k
through the points ``(index, value bits)``. Storing k coefficients costs the same as storing
k values, but needs no room for the indices: the verifier picks its own top-k indices and
evaluates the polynomial there. The layout matches PyPI ``toploc`` 0.1.6 byte for byte:
a big-endian u16 index modulus, then the coefficients as big-endian u16, lowest degree first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRIME = 65497
"""The field: every coefficient and every evaluation is reduced modulo this prime."""

MAX_INDEX_MODULUS = 65497
"""Where the search for an index modulus starts (downwards), as in the reference."""

_inverses: np.ndarray | None = None


def _inverse_table() -> np.ndarray:
    """``table[a] = a^-1 mod PRIME`` (Fermat), built once: interpolation needs ~8k inverses."""
    global _inverses
    if _inverses is None:
        base = np.arange(PRIME, dtype=np.int64)
        result = np.ones(PRIME, dtype=np.int64)
        exponent = PRIME - 2
        while exponent:
            if exponent & 1:
                result = result * base % PRIME
            base = base * base % PRIME
            exponent >>= 1
        result[0] = 0
        _inverses = result
    return _inverses


def injective_modulus(xs: np.ndarray) -> int:
    """Largest ``m <= 65497`` keeping ``xs % m`` distinct, so indices fit in one field element.

    Flat indices of a long prefill exceed the field; reducing them by such an ``m`` keeps the
    points distinct. The first candidate almost always works, so the scan is short.
    """
    xs = np.asarray(xs, dtype=np.int64)
    for modulus in range(MAX_INDEX_MODULUS, 0, -1):
        if np.unique(xs % modulus).size == xs.size:
            return modulus
    raise ValueError("no injective modulus exists for these indices")  # pragma: no cover


def interpolate(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Coefficients (lowest degree first) of the polynomial of degree < n through the points.

    ``xs`` must be distinct modulo :data:`PRIME`. The polynomial is unique, so any correct
    method gives the reference's coefficients; Newton's divided differences are the cheapest.
    """
    xs = np.asarray(xs, dtype=np.int64) % PRIME
    ys = np.asarray(ys, dtype=np.int64) % PRIME
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size == 0:
        raise ValueError("xs and ys must be non-empty 1-D arrays of the same length")
    if np.unique(xs).size != xs.size:
        raise ValueError("xs must be distinct modulo the prime")
    inverses = _inverse_table()
    diffs = ys.copy()
    for k in range(1, xs.size):
        gaps = (xs[k:] - xs[:-k]) % PRIME
        diffs[k:] = (diffs[k:] - diffs[k - 1 : -1]) % PRIME * inverses[gaps] % PRIME
    # Expand the Newton form from the innermost term: p = d[i] + (x - x[i]) * p.
    coeffs = diffs[-1:].copy()
    for i in range(xs.size - 2, -1, -1):
        expanded = np.zeros(coeffs.size + 1, dtype=np.int64)
        expanded[1:] = coeffs
        expanded[:-1] -= xs[i] * coeffs
        expanded[0] += diffs[i]
        coeffs = expanded % PRIME
    return coeffs


def evaluate(coeffs: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The polynomial at each of ``xs`` (Horner's rule, everything modulo :data:`PRIME`)."""
    xs = np.asarray(xs, dtype=np.int64) % PRIME
    result = np.zeros(xs.shape, dtype=np.int64)
    for coeff in np.asarray(coeffs, dtype=np.int64)[::-1]:
        result = (result * xs + coeff) % PRIME
    return result


@dataclass(frozen=True, slots=True)
class IndexPolynomial:
    """A polynomial over reduced indices: ``value(i) = p(i % modulus)``.

    ``modulus == 0`` marks the reference's null proof (all zeros), which never verifies.
    """

    modulus: int
    coeffs: tuple[int, ...]

    @classmethod
    def through(cls, indices: np.ndarray, values: np.ndarray) -> IndexPolynomial:
        """The polynomial taking each index to its value (values are u16 bit patterns)."""
        indices = np.asarray(indices, dtype=np.int64)
        modulus = injective_modulus(indices)
        coeffs = interpolate(indices % modulus, values)
        return cls(modulus, tuple(int(c) for c in coeffs))

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        if self.modulus == 0:
            raise ValueError("a null proof cannot be evaluated")
        return evaluate(np.asarray(self.coeffs), np.asarray(indices, dtype=np.int64) % self.modulus)

    def to_bytes(self) -> bytes:
        words = np.array([self.modulus, *self.coeffs], dtype=">u2")
        return words.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> IndexPolynomial:
        if len(data) < 4 or len(data) % 2:
            raise ValueError(f"a proof is an even number (>= 4) of bytes, got {len(data)}")
        words = np.frombuffer(data, dtype=">u2")
        return cls(int(words[0]), tuple(int(w) for w in words[1:]))
