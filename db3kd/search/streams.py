"""Counter-based random streams: every random number is a pure function of its key and counter.

A stream draw is ``hash(key, counter)`` with SplitMix64's finaliser (a bijection of 64-bit
words, Steele et al. 2014) in wrapping int64 tensor arithmetic, so it runs on any device, needs
no generator state and gives the same bits on CPU and GPU (the float transforms below may
differ there in the last ulp of ``log``/``cos``). A key is built from an explicit
:class:`Stream` id, the run seed and the draw's own coordinates, e.g. ``(Stream.MBD, seed,
sample index, class, iteration)``: two parts of the engine never share a key because their
stream ids differ, and a draw never depends on which other samples share its chunk, on the chunk
size or on the process that computes it.

Functions (all vectorised over int64 key tensors of any shape K):

* :func:`stream_key` (stream, seed, *fields) -> int64 K
* :func:`uniform` (keys, n) -> float32 (*K, n) in [0, 1), 24-bit resolution
* :func:`normal` (keys, n) -> float32 (*K, n), N(0, 1) by Box-Muller (tails cut at 5.8 sigma)
* :func:`rademacher` (keys, n) -> float32 (*K, n) in {-1, +1}, one hash per 48 values
* :class:`KeyedGenerator`: ``rand``/``randn``/``randint`` from one key, successive calls
  reading successive counter blocks (a drop-in for the calls :func:`db3kd.zeroshot.initial_noise` makes)
"""

from __future__ import annotations

import enum
import math

import torch

__all__ = ["Stream", "stream_key", "combine", "uniform", "normal", "rademacher", "KeyedGenerator"]

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


class Stream(enum.IntEnum):
    """Random-stream ids: one per place the engine draws random numbers (disjoint by construction)."""

    MBD = 1  # label construction: the MBD walk's probe directions (keyed by sample index, class, iteration)
    GENERATION_NOISE = 2  # ZSDB3KD: initial noise of a chunk (chunk index, draw)
    GENERATION_STARTS = 3  # ZSDB3KD: the T start points of each sample (chunk index)
    GENERATION_WALK = 4  # ZSDB3KD: the MBD walk inside a generation iteration (sample, iteration, walk step)
    GENERATION_STEP = 5  # ZSDB3KD: the boundary normal at o* for the step away (sample, iteration)


def _signed(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 tensors (wrapping arithmetic): a bijection of 64-bit words."""
    x = x ^ _srl(x, 30)
    x = x * _signed(_M1)
    x = x ^ _srl(x, 27)
    x = x * _signed(_M2)
    return x ^ _srl(x, 31)


def mix_int(v: int) -> int:
    """:func:`mix` on one Python int (same bits): the reference the tensor version is tested against."""
    v &= _MASK64
    v ^= v >> 30
    v = (v * _M1) & _MASK64
    v ^= v >> 27
    v = (v * _M2) & _MASK64
    return _signed(v ^ (v >> 31))


def combine(key, field) -> torch.Tensor:
    """Key extended by one more coordinate: ``mix(key ^ mix(field + golden))`` (int64, broadcast)."""
    field = torch.as_tensor(field, dtype=torch.int64)
    key = torch.as_tensor(key, dtype=torch.int64, device=field.device)
    return mix(key ^ mix(field + _signed(_GOLDEN)))


def stream_key(stream: Stream | int, seed: int, *fields, device=None) -> torch.Tensor:
    """int64 key of ``(stream, seed, *fields)``; fields are ints or int64 tensors (broadcast together).

    The stream id and seed enter first, so keys of different streams differ in their first input.
    """
    base = mix_int(mix_int(int(stream) * _GOLDEN + 1) ^ (int(seed) & _MASK64))
    key = torch.tensor(base, dtype=torch.int64, device=device)
    for f in fields:
        f = torch.as_tensor(f, dtype=torch.int64, device=key.device)
        key = combine(key, f)
    return key


def _bits(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Hashes int64 (*K, n) of counters 0..n-1 under each key."""
    keys = torch.as_tensor(keys, dtype=torch.int64)
    counter = torch.arange(n, dtype=torch.int64, device=keys.device)
    return mix(keys.unsqueeze(-1) ^ mix(counter * _signed(_GOLDEN) + 0x632BE59BD9B4E019))


def uniform(keys: torch.Tensor, n: int) -> torch.Tensor:
    """float32 (*K, n) uniform in [0, 1) (24 bits), counters 0..n-1 under each key."""
    return _srl(_bits(keys, n), 40).to(torch.float32).mul_(2.0**-24)


def normal(keys: torch.Tensor, n: int) -> torch.Tensor:
    """float32 (*K, n) standard normal (Box-Muller on two 24-bit uniforms of one hash)."""
    h = _bits(keys, n)
    u1 = (_srl(h, 40) + 1).to(torch.float32).mul_(2.0**-24)  # (0, 1]
    u2 = (_srl(h, 16) & 0xFFFFFF).to(torch.float32).mul_(2.0**-24)  # [0, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


def rademacher(keys: torch.Tensor, n: int) -> torch.Tensor:
    """float32 (*K, n) random signs in {-1, +1}, 48 per hash."""
    words = -(-n // 48)
    h = _bits(keys, words)
    shifts = torch.arange(16, 64, dtype=torch.int64, device=h.device)
    bits = (h.unsqueeze(-1) >> shifts) & 1  # (*K, words, 48)
    return bits.flatten(-2)[..., :n].to(torch.float32).mul_(2.0).sub_(1.0)


class KeyedGenerator:
    """A stateless stand-in for ``torch.Generator`` reading successive blocks of one stream key.

    Call k (k = 0, 1, ...) draws from ``combine(key, k)``, so the sequence of draws is fixed by the
    code that makes them and by nothing else. ``rand(*shape)``, ``randn(*shape)`` give float32
    tensors on ``device``; ``randint(high, shape)`` int64 in [0, high) with ``high`` an int64
    tensor broadcast against ``shape`` (53-bit resolution).
    """

    def __init__(self, key: torch.Tensor, device=None):
        self.key = torch.as_tensor(key, dtype=torch.int64).to(device)
        self.device = self.key.device
        self._calls = 0

    def _next(self) -> torch.Tensor:
        k = combine(self.key, torch.tensor(self._calls, dtype=torch.int64, device=self.device))
        self._calls += 1
        return k

    def rand(self, *shape) -> torch.Tensor:
        n = math.prod(shape)
        return uniform(self._next(), n).view(*shape)

    def randn(self, *shape) -> torch.Tensor:
        n = math.prod(shape)
        return normal(self._next(), n).view(*shape)

    def randint(self, high: torch.Tensor, shape) -> torch.Tensor:
        n = math.prod(shape)
        u = _srl(_bits(self._next(), n), 11).to(torch.float64).mul_(2.0**-53).view(*shape)
        high = torch.as_tensor(high, device=self.device)
        return torch.minimum((u * high).long(), high.long() - 1)
