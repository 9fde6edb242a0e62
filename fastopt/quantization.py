"""Blockwise quantized state: ``state_dtype="int8"`` (after Dettmers et al. 2021, arXiv
2110.02861) and ``state_dtype="int4"`` (after Li et al. 2023, arXiv 2309.01507).

Each block of ``Format.block`` consecutive elements of a param is stored as one code per
element (the index of the nearest entry of a code table) and one fp32 scale, the block's
largest magnitude. Decoding is ``table[code] * scale``.

The tables are dynamic (non-linear): after the sign, the position of the first 1 bit picks a
decade, the remaining bits a linear step within it, so small values keep their relative
precision instead of rounding to zero. Built here from that description:

- 8-bit, blocks of 256, a byte per element:

  - signed (``exp_avg``): for decade ``k = 0..6``, ``2**(6-k)`` values evenly spaced over
    ``(0.1, 1] * 10**-k`` (the top one of each decade included), their negatives, and zero
    (twice, to fill 256 entries);
  - unsigned (``exp_avg_sq``): decades ``k = 0..7`` with ``2**(7-k)`` values each, and zero.

- 4-bit, blocks of 128, two elements per byte (element ``2j`` in the low nibble of byte
  ``j``, ``2j + 1`` in the high one; a param's odd last element leaves a zero nibble):

  - signed: decades ``k = 0..2`` with ``2**(2-k)`` values each, at the centres of their
    steps (0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875), their negatives, zero and
    1 (bitsandbytes' dynamic map of 3 exponent bits, which torchao's 4-bit AdamW uses: on
    noise-like moments its top decade's even steps beat ending each step at its top);
  - unsigned: decades ``k = 0..3`` with ``2**(3-k)`` values each (15), and ``1e-4`` where the
    8-bit table has zero. Four bits cannot reach the decades where 8 round to zero, and a
    root of ``exp_avg_sq`` decoded as zero would divide its element's ``exp_avg`` by ``eps``
    alone (Li et al.'s zero-point problem): the smallest entry is not zero, so a tiny
    ``exp_avg_sq`` decodes too large and its element's step is smaller, never larger. A
    block that is all zero has scale zero and still decodes to zero.

``exp_avg_sq`` is stored as its square root: the update only uses ``sqrt(v)``, and the square
root halves the dynamic range a block must span, so an element far below its block's largest
does not round to zero (which would divide its ``exp_avg`` by ``eps`` alone).

Codes are the count of midpoints between neighbouring entries that lie below the value
(``torch.bucketize``: a value on a midpoint takes the lower entry), found by the value's top 16
bits in a table of 65536 cells and one addition of its bits (all of them flipped when it is
negative: ``folded``), which carries into the code exactly when the value is above its
cell's midpoint (``encode``, ``cell_table``).

Tensors under ``MIN_SIZE`` elements keep fp32 state, as bitsandbytes does: their state costs
little and they are often the sensitive ones (norms, biases).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_SIZE = 4096
CODES = torch.uint8  # the stored dtype of both formats' codes (4-bit: two to a byte)
# Elements the CPU torch path decodes, steps and encodes at a time: a whole number of blocks of
# either format, whose temporaries (26-40 bytes an element) stay a few MB (half the widened
# paths' slice: as fast on large tensors, measured, and half the scratch on small models).
SLICE = 1 << 17


@dataclass(frozen=True)
class Format:
    """A blockwise format: its ``state_dtype`` name, bits per code, elements per block."""

    name: str
    bits: int
    block: int

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def code_bytes(self, numel: int) -> int:
        """Bytes of codes ``numel`` elements take."""
        return -(-numel // self.per_byte)

    def num_blocks(self, numel: int) -> int:
        return -(-numel // self.block)


INT8 = Format("int8", 8, 256)
INT4 = Format("int4", 4, 128)
FORMATS = {f.name: f for f in (INT8, INT4)}


def _decades(levels: int, top_bits: int, centres: bool = False) -> list:
    """Decade ``k < levels`` split into ``2**(top_bits - k)`` equal steps over
    ``(0.1, 1] * 10**-k``: each step's top (or its centre)."""
    values = []
    for k in range(levels):
        count = 2 ** (top_bits - k)
        scale = 10.0**-k
        values += [scale * (0.1 + 0.9 * (j + (0.5 if centres else 1)) / count)
                   for j in range(count)]
    return values


@functools.lru_cache(maxsize=None)
def code_table(signed: bool, fmt: Format = INT8) -> tuple:
    """The code values (256 or 16), ascending."""
    if fmt.bits == 8:
        if signed:
            positive = _decades(7, 6)  # 127 values
            values = positive + [-v for v in positive] + [0.0, 0.0]
        else:
            values = _decades(8, 7) + [0.0]  # 255 values and zero
    elif signed:
        positive = _decades(3, 2, centres=True)  # 7 values
        values = positive + [-v for v in positive] + [0.0, 1.0]
    else:
        values = _decades(4, 3) + [1e-4]  # 15 values and the smallest, not zero
    assert len(values) == 2**fmt.bits
    return tuple(sorted(values))


@functools.lru_cache(maxsize=32)
def tables(signed: bool, device: torch.device, fmt: Format = INT8) -> tuple:
    """(code values, midpoints between neighbours) as fp32 tensors on ``device``."""
    values = torch.tensor(code_table(signed, fmt), dtype=torch.float32, device=device)
    return values, (values[1:] + values[:-1]) / 2


def cell_codes(signed: bool, fmt: Format, top_bits: int = 16) -> tuple:
    """Per float's top ``top_bits`` bits (16: sign, exponent and 7 mantissa bits, 65536 cells;
    the 4-bit kernel's encoder takes 12): the code of the cell's lowest value and the first
    midpoint at or above that value (+inf past the last). At most one midpoint lies in a
    finite cell (checked here: the table's steps are wider than a cell), so a value's code is
    its cell's code, plus one if it is above its cell's midpoint: ``torch.bucketize``'s code
    exactly."""
    _, midpoints = tables(signed, torch.device("cpu"), fmt)
    low_bits = 32 - top_bits
    keys = torch.arange(1 << top_bits, dtype=torch.int32) << low_bits
    ends = (keys | ((1 << low_bits) - 1)).view(torch.float32)
    lowest = torch.minimum(keys.view(torch.float32), ends)
    highest = torch.maximum(keys.view(torch.float32), ends)
    codes = torch.bucketize(lowest, midpoints)
    finite = highest.isfinite() & lowest.isfinite()
    assert int((torch.bucketize(highest, midpoints) - codes)[finite].max()) <= 1
    padded = torch.cat([midpoints, midpoints.new_full((1,), float("inf"))])
    return codes.to(torch.int32), padded[codes]


def folded(bits: Tensor) -> Tensor:
    """A float's int32 view (``bits``) with every bit flipped when the float is negative
    (``bits >> 31`` is all ones then; the result is never negative): its low 16 bits order
    the floats of a cell by value (as they are for a positive float, reversed for a negative
    one, whose magnitude grows with them), and its top bits depend on the cell alone
    (``_cell_entries`` takes them off). One int32 temporary (the result)."""
    key = bits >> 31
    key ^= bits
    return key


def _cell_entries(signed: bool, fmt: Format) -> Tensor:
    """One sign's encoder table (CPU): one int32 per cell of a float's top 16 bits, such that
    ``code = (entry + folded(bits)) >> 16`` is ``torch.bucketize``'s code for every finite
    value in [-1, 1] (checked here on each cell's threshold and the keys either side of it)
    and for a nan (no value is above a midpoint). The entry is the code of the cell's lowest
    value in bits 16-23 and below them ``0xFFFF - t``, where ``t`` is such that a value of
    the cell lies above the cell's midpoint exactly when the low 16 bits of its ``folded``
    bits exceed ``t`` (the midpoint's own; 0xFFFF, never, where no value of the cell is above
    it), so that adding them carries one into the code exactly then; less the top bits of
    the cell's ``folded`` bits, which the addition brings back (no int32 overflow: the sum
    is the code word itself)."""
    codes, midpoints = cell_codes(signed, fmt)
    cells = torch.arange(1 << 16, dtype=torch.int32)
    mid_bits = midpoints.view(torch.int32)
    inside = (((mid_bits >> 16) & 0xFFFF) == cells) & midpoints.isfinite()
    threshold = torch.where(inside, folded(mid_bits) & 0xFFFF, 0xFFFF)
    entry = ((codes << 16) | (0xFFFF - threshold)) - ((folded(cells << 16) >> 16) << 16)
    for key in (threshold, (threshold + 1).clamp(max=0xFFFF), threshold.clamp(min=1) - 1):
        bits = (cells << 16) | (folded((cells << 16) | key) & 0xFFFF)  # low bits: ``key``
        x = bits.view(torch.float32)
        checked = x.isfinite() & (x.abs() <= 1)
        want = codes + (x > midpoints).to(torch.int32)
        assert torch.equal(((entry + folded(bits)) >> 16)[checked], want[checked])
    return entry


@functools.lru_cache(maxsize=8)
def moment_cells(fmt: Format, device: torch.device) -> tuple:
    """Both moments' encoder tables in one (``encode_moments``): the signed one, then the
    unsigned one (``_cell_entries``), each turned by half its length so that a cell's place
    is its top 16 bits read as a signed number plus its table's offset, 1 << 15
    (``exp_avg``'s) or 3 << 15 (``sqrt(exp_avg_sq)``'s); and those offsets, int32 [2, 1]."""
    cells = torch.cat([_cell_entries(signed, fmt).roll(1 << 15) for signed in (True, False)])
    offsets = torch.tensor([[1 << 15], [3 << 15]], dtype=torch.int32)
    return cells.to(device), offsets.to(device)


def cell_table(signed: bool, device: torch.device, fmt: Format = INT8) -> Tensor:
    """One sign's encoder table (a view into ``moment_cells``): its entry for a float is at
    the float's top 16 bits read as a signed number plus 1 << 15."""
    cells, _ = moment_cells(fmt, device)
    half = 0 if signed else 1 << 16
    return cells[half : half + (1 << 16)]


@functools.lru_cache(maxsize=8)
def byte_pairs(signed: bool, device: torch.device) -> Tensor:
    """fp32 [256, 2]: the values of a byte's two 4-bit codes, low nibble first."""
    values, _ = tables(signed, device, INT4)
    byte = torch.arange(256, device=device)
    return torch.stack([values[byte & 15], values[byte >> 4]], dim=1)


@functools.lru_cache(maxsize=8)
def code_and_cell_tables(fmt: Format, device: torch.device) -> tuple:
    """([code values], [encoder cells]) of ``fmt`` on ``device``, signed (``exp_avg``'s) then
    unsigned (``sqrt(exp_avg_sq)``'s): ``tables`` and ``cell_table``, fetched once (a compiled
    CPU step takes all four on every slice)."""
    return ([tables(signed, device, fmt)[0] for signed in (True, False)],
            [cell_table(signed, device, fmt) for signed in (True, False)])


TABLE_BYTES = (1 << 16) * 4  # one sign's half of moment_cells: an int32 a cell


def build_tables(fmt: Format, device: torch.device) -> None:
    """Make ``fmt``'s encoder tables on ``device`` now (the CPU path builds them when a bucket
    is laid out, so that their build's temporaries never meet a step's)."""
    moment_cells(fmt, device)
    for signed in (True, False):
        if fmt.bits == 4:
            byte_pairs(signed, device)


def clear_tables() -> None:
    """Forget every table made (a cold start: ``benchmarks/cold_memory.py``)."""
    for cached in (moment_cells, tables, byte_pairs, code_and_cell_tables):
        cached.cache_clear()


def encode(normalized: Tensor, signed: bool, fmt: Format = INT8) -> Tensor:
    """uint8 codes of fp32 values in [-1, 1] (unsigned: [0, 1]): the nearest table entry's
    index, a midpoint taking the lower one (``torch.bucketize``), by one lookup of the value's
    cell (``cell_table``) and one addition."""
    bits = normalized.reshape(-1).view(torch.int32)
    words = _code_words(bits, cell_table(signed, normalized.device, fmt), 1 << 15)
    return (words >> 16).to(CODES).view(normalized.shape)


def _code_words(bits: Tensor, cells: Tensor, offsets) -> Tensor:
    """int32 words holding in bits 16-23 the codes of floats ``bits`` (their int32 views): each
    float's entry in ``cells``, at its top 16 bits read as a signed number plus ``offsets``
    (``cell_table``, ``moment_cells``), plus its ``folded`` bits."""
    index = (bits >> 16).add_(offsets)
    words = torch.index_select(cells, 0, index.view(-1)).view(index.shape)
    del index
    words += folded(bits)
    return words


def encode_moments(normalized: Tensor, fmt: Format) -> Tensor:
    """Both moments' codes at once: ``normalized`` is fp32 [2, n], ``exp_avg``'s values in
    [-1, 1] then ``sqrt(exp_avg_sq)``'s in [0, 1] (n even); one lookup in ``moment_cells``
    and one addition each, as ``encode`` finds them, ``ENCODE_PIECE`` columns at a time.
    Returns uint8 [2, ``code_bytes(n)``] (4-bit codes two to a byte, as ``pack`` makes
    them)."""
    cells, offsets = moment_cells(fmt, normalized.device)
    length = normalized.shape[1]
    codes = torch.empty(2, fmt.code_bytes(length), dtype=CODES, device=normalized.device)
    for lo in range(0, length, ENCODE_PIECE):
        bits = normalized[:, lo : lo + ENCODE_PIECE].view(torch.int32)
        words = _code_words(bits, cells, offsets)
        if _LITTLE_ENDIAN:  # bits 16-23: the third byte of each int32
            piece = words.view(torch.uint8)[:, 2::4]
        else:
            piece = (words >> 16).to(CODES)
        if fmt.bits == 4:
            piece = piece[:, 0::2] | (piece[:, 1::2] << 4)
        codes[:, lo // fmt.per_byte : (lo + bits.shape[1]) // fmt.per_byte].copy_(piece)
    return codes


# Columns ``encode_moments`` encodes at a time: its int32 temporaries (16 bytes a column) are
# then, on a CPU slice of ``SLICE`` columns, 8 bytes a column, as much as the fp32 moments
# themselves; and a small slice is one piece (the ops' fixed costs paid once).
ENCODE_PIECE = 1 << 16
_LITTLE_ENDIAN = sys.byteorder == "little"


def _blocks(flat: Tensor, fmt: Format) -> Tensor:
    """``flat`` zero-padded to whole blocks (a view when they are whole), one row per block."""
    n = flat.numel()
    if n % fmt.block == 0:
        return flat.view(-1, fmt.block)
    return torch.nn.functional.pad(flat, (0, fmt.num_blocks(n) * fmt.block - n)).view(
        -1, fmt.block)


def pack(codes: Tensor, fmt: Format) -> Tensor:
    """Codes (flat, one per element) as stored: uint8, 4-bit ones two to a byte."""
    codes = codes.to(CODES)
    if fmt.bits == 8:
        return codes
    pairs = torch.nn.functional.pad(codes, (0, codes.numel() % 2)).view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack(stored: Tensor, numel: int, fmt: Format) -> Tensor:
    """Stored codes -> int32 codes, one per element (``numel`` of them)."""
    flat = stored.reshape(-1)
    if fmt.bits == 8:
        return flat.int()
    return torch.stack([flat & 15, flat >> 4], dim=1).view(-1)[:numel].int()


def block_scales(blocks: Tensor) -> tuple:
    """Each block's scale, its largest magnitude, of fp32 ``blocks`` [..., block], and what
    the block is divided by: its scale, or 1 where all are zero ([..., 1])."""
    scales = blocks.abs().amax(dim=-1)
    return scales, torch.where(scales > 0, scales, 1.0).unsqueeze(-1)


def normalize_blocks(blocks: Tensor) -> Tensor:
    """Each block's scale (``block_scales``), and the blocks divided by it in place."""
    scales, divisors = block_scales(blocks)
    blocks.div_(divisors)
    return scales


def quantize(values: Tensor, signed: bool, fmt: Format = INT8) -> tuple:
    """``values`` (one param, any shape) -> (codes, fp32 scales [blocks]). 8-bit codes have the
    values' shape; 4-bit ones are flat, ``code_bytes(numel)`` bytes."""
    flat = values.reshape(-1).float()
    padded = _blocks(flat, fmt)
    if padded.data_ptr() == values.data_ptr():  # a view of the caller's values: not changed
        padded = padded.clone()
    scales = normalize_blocks(padded)
    codes = encode(padded, signed, fmt).view(-1)[: flat.numel()]
    stored = pack(codes, fmt)
    return (stored.view(values.shape) if fmt.bits == 8 else stored), scales


def _decode_into(out: Tensor, codes: Tensor, signed: bool, fmt: Format, n: int) -> None:
    """The table values of ``n`` elements' codes (as stored) into the first ``n`` elements of
    fp32 ``out`` (4-bit codes: each byte's pair of values at once, so an odd ``n`` writes one
    element more)."""
    index = codes.reshape(-1).int()
    if fmt.bits == 8:
        torch.index_select(tables(signed, out.device, fmt)[0], 0, index, out=out[:n])
    else:
        torch.index_select(byte_pairs(signed, out.device), 0, index,
                           out=out[: 2 * index.numel()].view(-1, 2))


def dequantize(codes: Tensor, scales: Tensor, signed: bool, fmt: Format = INT8,
               shape=None) -> Tensor:
    """codes (one param) and their block scales -> fp32 values of ``shape`` (default: the
    codes' own shape, which is the param's for 8-bit codes): each code's table value times
    its block's scale."""
    shape = codes.shape if shape is None else shape
    numel = 1
    for size in shape:
        numel *= size
    out = torch.empty(fmt.num_blocks(numel) * fmt.block, device=codes.device)
    _decode_into(out, codes, signed, fmt, numel)
    out.view(-1, fmt.block).mul_(scales[:, None])
    return out[:numel].view(shape)


def decode_moments(m_codes: Tensor, v_codes: Tensor, scales: Tensor, fmt: Format,
                   n: int) -> Tensor:
    """Both moments of ``n`` elements at once: fp32 [2, blocks * block], ``exp_avg``'s values
    then ``sqrt(exp_avg_sq)``'s (``scales``: [2, blocks], in that order) as ``dequantize``
    decodes them, and zero past ``n`` (for ``encode_moments``)."""
    out = torch.empty(2, scales.shape[1] * fmt.block, device=m_codes.device)
    _decode_into(out[0], m_codes, True, fmt, n)
    _decode_into(out[1], v_codes, False, fmt, n)
    out[:, n:].zero_()
    out.view(2, -1, fmt.block).mul_(scales[:, :, None])
    return out


def saved_format(codes: Tensor, numel: int) -> Format | None:
    """The format of saved codes of a param of ``numel`` elements, from their size."""
    for fmt in FORMATS.values():
        if codes.dtype == CODES and codes.numel() == fmt.code_bytes(numel):
            return fmt
    return None
