"""Counter-based random numbers: a uniform for every (key, stream, counter), computed, not drawn.

A story's tokens must not depend on which slot or batch it was sampled in, nor on what ran
before it, so that a resumed corpus and one sampled at another batch size are identical (on the
same machine). A sequential generator (torch.rand) cannot give that once stories start and end
at different steps in a continuously refilled batch; a counter-based one can: the uniform for
story i at position t is a pure function hash(key, i, t). Written by hand because torch exposes
no elementwise counter-based generator (its Philox is only reachable through the sequential
`torch.Generator`). The hash is SplitMix64's finaliser (Steele et al. 2014), applied twice to
chain the three inputs; it passes BigCrush as a generator, and the tests check the uniforms and
the draws made from them statistically.

All arithmetic is on int64 tensors, wrapping like uint64 (multiplication and addition wrap in
two's complement on CPU and CUDA), with logical right shifts done by masking.
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64: add the golden gamma, then the finaliser; a bijection on 64-bit words."""
    z = x + _signed(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed(_MIX2)
    return z ^ _shr(z, 31)


def uniforms(key: int, streams: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1), one per element of `streams` and `counters` (broadcast).

    Args:
        key: a 64-bit key (e.g. `derive_seed(run seed, "sample", generation)`).
        streams: int64 stream ids (e.g. story indices), on any device.
        counters: int64 counters within a stream (e.g. token positions).

    Returns:
        The same uniforms for the same (key, stream, counter) on any device and in any batch.
    """
    # the key enters as a Python scalar, not a tensor: no host-to-device copy (which a CUDA
    # graph could not record)
    h = _mix(_mix(streams.to(torch.int64) ^ _signed(key)) ^ counters.to(torch.int64))
    return _shr(h, 11).to(torch.float64) * (1.0 / (1 << 53))  # top 53 bits: exact in float64
