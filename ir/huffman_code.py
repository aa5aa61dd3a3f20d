"""Canonical Huffman codes: optimal code lengths, the codes they imply, packing and unpacking bits.

Only the code lengths are stored: canonical codes are handed out in (length, symbol)
order, as in DEFLATE (RFC 1951 §3.2.2), so a decoder rebuilds the same codes from the
lengths. A fixed-width code is the same thing with every length equal, so one bit
packer and one decoder serve both. Bits are packed most significant first.
"""
from __future__ import annotations

import heapq
import math

import numpy as np

# the decoder reads each code through a 64-bit window starting anywhere in a byte: 57 + 7 = 64
MAX_CODE_LENGTH = 57


class CodeError(ValueError):
    """A code table or bitstream that cannot be decoded."""


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length per symbol (0 for symbols that never occur), from their counts."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.int64)
    used = np.flatnonzero(counts)
    if len(used) == 1:
        lengths[used] = 1  # a lone symbol still needs one bit per occurrence
    if len(used) <= 1:
        return lengths
    # leaves are nodes 0..n-1, each merge makes a new node; ties broken by node id (deterministic)
    heap = [(int(counts[symbol]), node) for node, symbol in enumerate(used)]
    heapq.heapify(heap)
    parent: list[int] = [-1] * len(used)
    while len(heap) > 1:
        (count_a, a), (count_b, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = len(parent)
        parent.append(-1)
        heapq.heappush(heap, (count_a + count_b, len(parent) - 1))
    depth = [0] * len(parent)
    for node in range(len(parent) - 2, -1, -1):  # a parent is made after its children
        depth[node] = depth[parent[node]] + 1
    lengths[used] = depth[:len(used)]
    return lengths


def fixed_lengths(symbols: int) -> np.ndarray:
    """Every symbol ceil(log2(symbols)) bits (at least 1)."""
    return np.full(symbols, max(1, math.ceil(math.log2(symbols))), dtype=np.int64)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The code of each symbol (uint64, right-aligned) for these lengths; raises CodeError if they overfill."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > MAX_CODE_LENGTH):
        raise CodeError(f"code lengths must lie in 0..{MAX_CODE_LENGTH}")
    used = np.flatnonzero(lengths)
    kraft = sum(1 << (MAX_CODE_LENGTH - int(length)) for length in lengths[used])  # exact, in integers
    if kraft > 1 << MAX_CODE_LENGTH:  # no prefix code has these lengths
        raise CodeError("the code lengths do not form a prefix code (Kraft sum above 1)")
    codes = np.zeros(len(lengths), dtype=np.uint64)
    code, previous = 0, 0
    for symbol in used[np.argsort(lengths[used], kind="stable")]:
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        code, previous = code + 1, int(lengths[symbol])
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """Pack the codes of `symbols` (bytes, bit count)."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    codes = canonical_codes(lengths)
    symbol_lengths = np.asarray(lengths, dtype=np.int64)[symbols]
    if np.any(symbol_lengths == 0):
        raise CodeError("a symbol to encode has no code (length 0)")
    symbol_codes = codes[symbols]
    ends = np.cumsum(symbol_lengths)
    starts = ends - symbol_lengths
    bit_count = int(ends[-1]) if len(ends) else 0
    bits = np.zeros(bit_count, dtype=np.uint8)
    for k in range(int(symbol_lengths.max(initial=0))):  # k-th bit of every code at least k+1 long
        has = symbol_lengths > k
        shift = (symbol_lengths[has] - 1 - k).astype(np.uint64)
        bits[starts[has] + k] = (symbol_codes[has] >> shift) & np.uint64(1)
    return np.packbits(bits).tobytes(), bit_count


def decode(data: bytes, bit_count: int, lengths: np.ndarray, count: int) -> np.ndarray:
    """Unpack `count` symbols (int64) from the first `bit_count` bits of `data`; CodeError if they do not fit."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = canonical_codes(lengths)
    if count == 0:
        if bit_count:
            raise CodeError(f"{bit_count} bits hold no symbols")
        return np.zeros(0, dtype=np.int64)
    if bit_count < count or len(data) != (bit_count + 7) // 8:
        raise CodeError(f"{bit_count} bits in {len(data)} bytes cannot hold {count} symbols")
    used = np.flatnonzero(lengths)
    if not used.size:
        raise CodeError("the code table has no symbols")
    # Vectorised canonical decoding: left-aligned to `width` bits, the canonical codes in order cover
    # consecutive intervals, so the code starting at any bit position is found by one searchsorted of
    # the next `width` bits. That is done for every position at once; a Python loop then only hops
    # from code to code (one step per symbol, not per bit), and the symbols are read at the hops.
    width = int(lengths.max())
    by_code = used[np.lexsort((used, lengths[used]))]          # symbols in canonical order
    code_length = lengths[by_code]
    interval_ends = (codes[by_code] + np.uint64(1)) << (width - code_length).astype(np.uint64)
    padded = np.frombuffer(bytes(data) + bytes(8), dtype=np.uint8).astype(np.uint64)
    words = np.zeros(len(data) + 1, dtype=np.uint64)           # 8 bytes from each byte offset, big-endian
    for i in range(8):
        words |= padded[i:i + len(words)] << np.uint64(56 - 8 * i)

    def windows(positions: np.ndarray) -> np.ndarray:
        shifted = words[positions >> 3] << (positions & 7).astype(np.uint64)
        return shifted >> np.uint64(64 - width)

    step = np.empty(bit_count, dtype=np.uint8)  # code length at each bit position (MAX_CODE_LENGTH < 256)
    for start in range(0, bit_count, 1 << 20):
        positions = np.arange(start, min(start + (1 << 20), bit_count), dtype=np.int64)
        which = np.searchsorted(interval_ends, windows(positions), side="right")
        # bits past the last code (an incomplete code table) are no code: step 0 stops the hops below
        lengths_here = code_length[np.minimum(which, len(by_code) - 1)]
        step[start:start + len(positions)] = np.where(which < len(by_code), lengths_here, 0)
    hops, position, step_list = [], 0, step.tolist()
    for i in range(count):
        if position >= bit_count or step_list[position] == 0:
            raise CodeError(f"the bitstream ends or holds an invalid code at bit {position} (symbol {i} of {count})")
        hops.append(position)
        position += step_list[position]
    if position != bit_count:
        raise CodeError(f"{count} symbols take {position} bits, the stream holds {bit_count}")
    which = np.searchsorted(interval_ends, windows(np.array(hops, dtype=np.int64)), side="right")
    return by_code[which]
