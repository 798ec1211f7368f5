"""Delta codecs: how (expert - base) is stored, tensor by tensor.

A codec declares its options (:class:`ParamSpec`, as merge methods do), turns a base
and an expert tensor into named parts, and turns the parts and the base back into the
expert tensor. ``lossless`` reproduces the expert's bytes exactly; the others trade
accuracy for size. Selected on the command line as ``NAME`` or
``NAME:key=value,key=value`` (e.g. ``sparse:density=0.05,values=int8``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from hivemerge.merge.numerics import exact, kernels, rng, threads
from hivemerge.merge.numerics.bits import count_bits, count_bits_per_group, pack_bits, signed_bits, unpack_bits
from hivemerge.merge.params import ParamSpec
from hivemerge.protocol.errors import UserInputError

Parts = dict[str, torch.Tensor]
_BITS_DTYPE = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


class Codec:
    name: ClassVar[str]
    summary: ClassVar[str]
    options: ClassVar[tuple[ParamSpec, ...]] = ()
    lossy: ClassVar[bool] = True

    def encode(self, name: str, base: torch.Tensor, expert: torch.Tensor, opts: dict[str, Any]) -> Parts:
        raise NotImplementedError

    def decode(self, base: torch.Tensor, parts: Parts, dtype: torch.dtype, shape: tuple[int, ...], opts: dict[str, Any],
               out: torch.Tensor | None = None) -> torch.Tensor:
        """The expert's tensor; written into ``out`` when given (it may be ``base`` itself,
        read for this decode: a span is read before it is written)."""
        raise NotImplementedError

    def squares(self, parts: Parts, shape: tuple[int, ...], opts: dict[str, Any]) -> float | None:
        """The sum of the squared delta entries as encoded (float32 entries squared exactly
        in float64, summed in a fixed order: every peer gets the same number), from the
        parts alone, after checking their sizes and that they are finite; None when the
        base is needed (the delta is then decoded)."""
        return None


CODECS: dict[str, Codec] = {}


def register(cls: type[Codec]) -> type[Codec]:
    CODECS[cls.name] = cls()
    return cls


def _delta(base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    return expert.to(torch.float32).reshape(-1) - base.to(torch.float32).reshape(-1)


# Elements decoded at a time (a multiple of 8, so spans start on a mask byte): a decode's
# float32 temporaries are span-sized, whatever the tensor (a 128k-vocabulary embedding
# decoded whole made four float32 copies of itself), and the spans are shared among the
# merge's workers. Elementwise work: the size never changes a byte.
_DECODE_SPAN = 1 << 18


def _rebuild(base: torch.Tensor, dtype: torch.dtype, shape, delta_at: Callable[[int, int], torch.Tensor],
             out: torch.Tensor | None = None, fused: Callable[[kernels.Array, kernels.Array, int, int], None] | None = None
             ) -> torch.Tensor:
    """``(base + delta).to(dtype)`` computed in float32 a span at a time, the spans split
    among the merge's workers: ``delta_at(start, stop)`` gives the delta of flat entries
    ``start .. stop-1`` of a span, whichever span came before. Into ``out`` (it may be
    ``base``: each span is read before it is written) when it has the size and dtype,
    else into new memory. ``fused(base, out, start, stop)``, where given and the
    tensors suit numerics/kernels.py, writes a span in one loop instead."""
    flat = base.reshape(-1)
    if out is None or out.numel() != flat.numel() or out.dtype != dtype:
        out = torch.empty(flat.numel(), dtype=dtype)
    out = out.view(-1)
    if fused is not None and not kernels.usable(flat, out):
        fused = None
    if fused is not None:  # numpy views, made once
        raw_flat, raw_out = kernels.raw(flat), kernels.raw(out)

    def rebuild(start: int) -> None:
        stop = min(flat.numel(), start + _DECODE_SPAN)
        if fused is not None:
            fused(raw_flat, raw_out, start, stop)
        else:
            out[start:stop] = (flat[start:stop].to(torch.float32) + delta_at(start, stop)).to(dtype)

    threads.each(rebuild, range(0, flat.numel(), _DECODE_SPAN), threads.parts_on(flat.device))
    return out.view(shape)


def _kept_before(mask: torch.Tensor, count: int) -> tuple[list[int], int]:
    """How many of the first ``count`` bits of a packed mask are set before each decode
    span (so that the spans decode on their own), and in all."""
    before, total = [], 0
    for start in range(0, count, _DECODE_SPAN):
        before.append(total)
        size = min(_DECODE_SPAN, count - start)
        total += count_bits(mask[start // 8 : (start + size + 7) // 8], size)
    return before, total


def _bits_at(packed: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Bits ``start .. start+count-1`` of a packed mask (numerics/bits.py), as booleans."""
    first = start // 8
    skip = start - 8 * first
    return unpack_bits(packed[first : (start + count + 7) // 8], skip + count)[skip:]


def _per_entry(scale: torch.Tensor, block: int, start: int, stop: int) -> torch.Tensor:
    """The float32 scale of each entry ``start .. stop-1`` (one scale per ``block`` entries)."""
    first = start // block
    expanded = scale[first : (stop - 1) // block + 1].to(torch.float32).repeat_interleave(block)
    return expanded[start - first * block : stop - first * block]


def _expect(parts: Parts, name: str, count: int, codec: str) -> None:
    if parts[name].numel() != count:
        raise UserInputError(f"{codec} delta: part {name} has {parts[name].numel()} entries, {count} expected")


def _finite(parts: Parts, codec: str, *names: str) -> None:
    for name in names:
        if not exact.all_finite(parts[name]):
            raise UserInputError(f"{codec} delta: part {name} holds NaN or Inf values")


def _non_negative(parts: Parts, codec: str, name: str) -> None:
    """Scales are magnitudes: one with its sign bit set (-0.0 included) is refused."""
    if bool(torch.signbit(parts[name]).any()):
        raise UserInputError(f"{codec} delta: part {name} holds negative values")


def _sum_of_squares(values_at: Callable[[int, int], torch.Tensor], count: int) -> float:
    """Sum of the squares of ``count`` float32 values given a span at a time: each square
    is exact in float64; each span is summed by a fixed tree, the spans by math.fsum."""
    return math.fsum(float(exact.pairwise_sum(values_at(s, min(count, s + _DECODE_SPAN)).to(torch.float64).square()))
                     for s in range(0, count, _DECODE_SPAN))


def _blockwise_squares(scale: torch.Tensor, per_block: torch.Tensor) -> float:
    """Sum over blocks of (entries of the block whose delta is +-scale) x scale**2."""
    return float(exact.pairwise_sum(scale.to(torch.float64).square() * per_block.to(torch.float64))) if scale.numel() else 0.0


def _block_counts(n: int, block: int) -> torch.Tensor:
    """How many of the ``n`` entries each block of ``block`` holds (the last may be partial)."""
    counts = torch.full((-(-n // block),), block, dtype=torch.int64)
    if counts.numel():
        counts[-1] = n - block * (counts.numel() - 1)
    return counts


def _scattered(mask: torch.Tensor, count: int, values_at: Callable[..., torch.Tensor]) -> Callable[[int, int], torch.Tensor]:
    """A ``delta_at`` for :func:`_rebuild` over ``count`` entries that is zero off the bit
    ``mask`` and, on it, ``values_at(i, j, keep, start, stop)``: kept entries ``i .. j-1``
    in float32, for the span ``start .. stop-1`` whose mask is ``keep``."""
    before, _ = _kept_before(mask, count)

    def delta_at(start: int, stop: int) -> torch.Tensor:
        keep = _bits_at(mask, start, stop - start)
        taken = before[start // _DECODE_SPAN]
        kept = int(keep.sum())
        delta = torch.zeros(stop - start, dtype=torch.float32)
        delta.masked_scatter_(keep, values_at(taken, taken + kept, keep, start, stop))  # the kept values, in order
        return delta

    return delta_at


@register
class Same(Codec):
    name = "same"
    summary = "The expert's tensor equals the base's; nothing is stored."
    lossy = False

    def encode(self, name, base, expert, opts):
        return {}

    def decode(self, base, parts, dtype, shape, opts, out=None):
        if out is base and base.dtype == dtype:  # decoded over the base's own copy: it is the expert already
            return base.reshape(shape)
        if out is not None and out.numel() == base.numel() and out.dtype == dtype:
            return out.view(shape).copy_(base.reshape(shape))
        return base.to(dtype).reshape(shape).clone()

    def squares(self, parts, shape, opts):
        return 0.0


@register
class Lossless(Codec):
    name = "lossless"
    summary = "Bit-exact: the XOR of the expert's and base's bit patterns."
    lossy = False

    def encode(self, name, base, expert, opts):
        if expert.dtype == base.dtype and expert.dtype in _BITS_DTYPE:
            bits = _BITS_DTYPE[expert.dtype]
            return {"xor": expert.reshape(-1).view(bits) ^ base.reshape(-1).view(bits)}
        return {"raw": expert.reshape(-1)}

    def decode(self, base, parts, dtype, shape, opts, out=None):
        if "raw" in parts:
            return parts["raw"].to(dtype).reshape(shape)
        bits = _BITS_DTYPE[dtype]
        return (parts["xor"] ^ base.reshape(-1).view(bits)).view(dtype).reshape(shape)


@register
class Fp16(Codec):
    name = "fp16"
    summary = "The delta in float16 (2 bytes per weight)."

    def encode(self, name, base, expert, opts):
        delta = _delta(base, expert)
        half = delta.to(torch.float16)
        return {"delta": half if torch.isfinite(half).all() else delta}  # fp32 where fp16 overflows

    def decode(self, base, parts, dtype, shape, opts, out=None):
        _expect(parts, "delta", base.numel(), "fp16")
        return _rebuild(base, dtype, shape, lambda start, stop: parts["delta"][start:stop].to(torch.float32), out)

    def squares(self, parts, shape, opts):
        n = math.prod(shape)
        _expect(parts, "delta", n, "fp16")
        _finite(parts, "fp16", "delta")
        return _sum_of_squares(lambda start, stop: parts["delta"][start:stop].to(torch.float32), n)


BLOCK = ParamSpec("block", int, 64, low=8, high=1 << 20, doc="weights per scale")


def _blocks(delta: torch.Tensor, block: int) -> torch.Tensor:
    pad = -delta.numel() % block
    if pad:
        delta = torch.cat([delta, delta.new_zeros(pad)])
    return delta.view(-1, block)


def _int8_quantize(values: torch.Tensor, block: int) -> Parts:
    blocks = _blocks(values, block)
    # float32, not fp16: typical fine-tune deltas (|delta| ~ 1e-4) put absmax/127 in fp16's
    # subnormal range, where the rounded scale clamps q and errors grow far beyond scale/2.
    scale = blocks.abs().amax(1) / 127  # amax is exact: order-free
    safe = torch.where(scale == 0, 1.0, scale.to(torch.float32)).unsqueeze(1)
    q = torch.round(blocks / safe).clamp(-127, 127).to(torch.int8)
    return {"q": q.reshape(-1), "scale": scale}


def _int8_dequantize(parts: Parts, count: int, block: int) -> torch.Tensor:
    q = parts["q"].to(torch.float32).view(-1, block)
    return (q * parts["scale"].to(torch.float32).unsqueeze(1)).reshape(-1)[:count]


@register
class Int8(Codec):
    name = "int8"
    summary = "The delta quantized to int8 with one absmax scale per block (about 1 byte per weight)."
    options = (BLOCK,)

    def encode(self, name, base, expert, opts):
        return _int8_quantize(_delta(base, expert), opts["block"])

    def decode(self, base, parts, dtype, shape, opts, out=None):
        n, block = base.numel(), opts["block"]
        _expect(parts, "q", -(-n // block) * block, "int8")
        _expect(parts, "scale", -(-n // block), "int8")
        return _rebuild(base, dtype, shape, self._values(parts, block), out)

    def squares(self, parts, shape, opts):
        n = math.prod(shape)
        block = opts["block"]
        _expect(parts, "q", -(-n // block) * block, "int8")
        _expect(parts, "scale", -(-n // block), "int8")
        _finite(parts, "int8", "scale")
        return _sum_of_squares(self._values(parts, block), n)

    @staticmethod
    def _values(parts: Parts, block: int) -> Callable[[int, int], torch.Tensor]:
        return lambda start, stop: parts["q"][start:stop].to(torch.float32) * _per_entry(parts["scale"], block, start, stop)


@register
class Sparse(Codec):
    name = "sparse"
    summary = "A fraction of the delta (largest magnitudes, or a DARE random draw rescaled), as a bit mask plus values."
    options = (
        ParamSpec("density", float, 0.1, low=0.0, high=1.0, low_open=True, doc="fraction of entries kept"),
        ParamSpec("select", str, "topk", choices=("topk", "dare"), doc="which entries are kept"),
        ParamSpec("values", str, "fp16", choices=("fp16", "int8"), doc="how kept values are stored"),
        ParamSpec("seed", int, 0, low=0, doc="seed of the DARE draw"),
        BLOCK,
    )

    def encode(self, name, base, expert, opts):
        delta = _delta(base, expert)
        density = opts["density"]
        if opts["select"] == "topk":
            keep = exact.top_k_mask(delta.abs(), max(1, round(density * delta.numel())))
            values = delta[keep]
        else:
            keep = rng.bernoulli_mask(rng.stream_key(opts["seed"], name, 0), delta.numel(), density)
            values = delta[keep] / density  # DARE rescale keeps the expected delta
        parts = {"mask": pack_bits(keep)}
        if opts["values"] == "fp16":
            parts["values"] = values.to(torch.float16)
        else:
            parts.update(_int8_quantize(values, opts["block"]))
        return parts

    def decode(self, base, parts, dtype, shape, opts, out=None):
        n = base.numel()
        values = self._kept_values(parts, n, opts)
        return _rebuild(base, dtype, shape, _scattered(parts["mask"], n, lambda i, j, keep, start, stop: values[i:j].to(torch.float32)), out)

    def squares(self, parts, shape, opts):
        n = math.prod(shape)
        values = self._kept_values(parts, n, opts)
        _finite({"values": values}, "sparse", "values")
        return _sum_of_squares(lambda i, j: values[i:j].to(torch.float32), values.numel())

    @staticmethod
    def _kept_values(parts: Parts, n: int, opts: dict[str, Any]) -> torch.Tensor:
        """The kept entries' values (fp16, or int8 dequantized to float32), one per mask bit set."""
        _expect(parts, "mask", (n + 7) // 8, "sparse")
        count = count_bits(parts["mask"], n)
        values = parts["values"] if "values" in parts else _int8_dequantize(parts, count, opts["block"])
        if values.numel() != count:
            raise UserInputError(f"sparse delta: {values.numel()} values for {count} kept entries")
        return values


@register
class Sign1(Codec):
    name = "sign1"
    summary = "BitDelta style: one sign bit per weight and one scale (mean |delta|) per block."
    options = (ParamSpec("block", int, 128, low=8, high=1 << 20, doc="weights per scale"),)

    def encode(self, name, base, expert, opts):
        delta = _delta(base, expert)
        block = opts["block"]
        blocks = _blocks(delta, block)
        # mean |delta| is the L2-optimal scale for a sign code; summed by a fixed tree. The
        # last block may be partial: its mean is over its real entries, not the padding.
        counts = torch.full((blocks.shape[0],), float(block), dtype=torch.float64, device=delta.device)
        if counts.numel():
            counts[-1] = delta.numel() - block * (blocks.shape[0] - 1)
        scale = (exact.pairwise_sum(blocks.abs(), dim=1) / counts).to(torch.float16)
        return {"signs": pack_bits(delta >= 0), "scale": scale}

    def decode(self, base, parts, dtype, shape, opts, out=None):
        n, block = base.numel(), opts["block"]
        _expect(parts, "signs", (n + 7) // 8, "sign1")
        _expect(parts, "scale", -(-n // block), "sign1")

        def delta_at(start: int, stop: int) -> torch.Tensor:
            scale = _per_entry(parts["scale"], block, start, stop)
            return torch.where(_bits_at(parts["signs"], start, stop - start), scale, -scale)

        return _rebuild(base, dtype, shape, delta_at, out)

    def squares(self, parts, shape, opts):
        n = math.prod(shape)
        block = opts["block"]
        _expect(parts, "signs", (n + 7) // 8, "sign1")
        _expect(parts, "scale", -(-n // block), "sign1")
        _finite(parts, "sign1", "scale")
        return _blockwise_squares(parts["scale"], _block_counts(n, block))


@register
class Ternary(Codec):
    name = "ternary"
    summary = (
        "Each weight becomes -s, 0 or +s (s per block): a bit mask of the entries kept and a sign bit "
        "for each kept entry, about 1.5 bits per weight."
    )
    options = (
        ParamSpec("block", int, 256, low=8, high=1 << 20, doc="weights per scale"),
        # 0.8: the default that meets issue 3's goal (>= 10x smaller, <= 1% held-out loss) in
        # scripts/bench_delta.py; 0.7 keeps a little more quality for 7% more bytes.
        ParamSpec("threshold", float, 0.8, low=0.0, high=4.0, doc="entries below threshold * sigma (per block) become 0"),
    )

    def encode(self, name, base, expert, opts):
        block = opts["block"]
        base, expert = base.reshape(-1), expert.reshape(-1)
        # Whole blocks a span at a time (each block is encoded on its own): the float64 sums of
        # a whole embedding's blocks took gigabytes. A multiple of 8 entries: mask bytes stay whole.
        span = block * 8 * max(1, _DECODE_SPAN // (block * 8))
        masks, signs, scales = [], [], []
        for start in range(0, base.numel(), span):
            delta = _delta(base[start : start + span], expert[start : start + span])
            blocks = _blocks(delta, block).abs()
            # sigma from the mean magnitude (sqrt(pi/2) * mean|x| for a Gaussian); sums by a fixed tree.
            counts = torch.full((blocks.shape[0],), float(block), dtype=torch.float64)
            counts[-1] = delta.numel() - block * (blocks.shape[0] - 1)  # the tensor's last block may be partial
            sigma = exact.pairwise_sum(blocks, dim=1) / counts * 1.2533141373155003
            keep = blocks > (sigma * opts["threshold"]).to(torch.float32).unsqueeze(1)
            kept = torch.where(keep, blocks, 0.0)
            # The L2-optimal magnitude for the kept support is their mean magnitude.
            scales.append(exact.pairwise_sum(kept, dim=1) / keep.sum(1).clamp(min=1).to(torch.float64))
            keep = keep.reshape(-1)[: delta.numel()]
            masks.append(pack_bits(keep))
            signs.append(delta[keep] >= 0)
        if not masks:  # an empty tensor
            return {"mask": pack_bits(torch.zeros(0, dtype=torch.bool)), "signs": pack_bits(torch.zeros(0, dtype=torch.bool)),
                    "scale": torch.zeros(0, dtype=torch.bfloat16)}
        # bf16 scale: fp32's range (fine-tune deltas are tiny), 2 bytes.
        return {"mask": torch.cat(masks), "signs": pack_bits(torch.cat(signs)), "scale": torch.cat(scales).to(torch.bfloat16)}

    def decode(self, base, parts, dtype, shape, opts, out=None):
        n, block = base.numel(), opts["block"]
        _expect(parts, "mask", (n + 7) // 8, "ternary")
        _expect(parts, "scale", -(-n // block), "ternary")
        before, count = _kept_before(parts["mask"], n)
        if parts["signs"].numel() != (count + 7) // 8:
            raise UserInputError(f"ternary delta: {parts['signs'].numel()} sign bytes for {count} kept entries")
        _non_negative(parts, "ternary", "scale")
        # Each entry: its block's scale times +1, -1 (kept, by its sign bit) or +0 (not kept),
        # without gathering the kept entries' scales: the same values as +-scale where kept.

        def delta_at(start: int, stop: int) -> torch.Tensor:
            signs, _ = signed_bits(parts["mask"], parts["signs"], start, stop - start, before[start // _DECODE_SPAN])
            return signs.to(torch.float32).mul_(_per_entry(parts["scale"], block, start, stop))

        def fused(flat: kernels.Array, into: kernels.Array, start: int, stop: int) -> None:
            kernels.ternary_span(flat, *raw_parts, block, start, stop, before[start // _DECODE_SPAN], into)

        usable = kernels.fits(parts["scale"]) and all(
            parts[p].dtype == torch.uint8 and parts[p].device.type == "cpu" for p in ("mask", "signs"))
        raw_parts = [kernels.raw(parts[p]) for p in ("mask", "signs", "scale")] if usable else []
        return _rebuild(base, dtype, shape, delta_at, out, fused if usable else None)

    def squares(self, parts, shape, opts):
        n = math.prod(shape)
        block = opts["block"]
        _expect(parts, "mask", (n + 7) // 8, "ternary")
        _expect(parts, "scale", -(-n // block), "ternary")
        _finite(parts, "ternary", "scale")
        _non_negative(parts, "ternary", "scale")
        if block % 8 == 0:  # blocks of whole mask bytes: counted a byte at a time
            kept = count_bits_per_group(parts["mask"], n, block)
        else:
            keep = unpack_bits(parts["mask"], n)  # a byte an entry: a quarter of the tensor's float32 size
            pad = -n % block
            kept = torch.cat([keep, keep.new_zeros(pad)]).view(-1, block).sum(1) if n else keep.new_zeros(0, dtype=torch.int64)
        if parts["signs"].numel() != (int(kept.sum()) + 7) // 8:
            raise UserInputError(f"ternary delta: {parts['signs'].numel()} sign bytes for {int(kept.sum())} kept entries")
        return _blockwise_squares(parts["scale"], kept)


MAX_RANK = 256  # a decode costs rank passes over the matrix: what one delta can make every peer compute is bounded
MAX_SCALE = 1e6  # lora_alpha / r is a few units; bounded so that no square of it overflows


@register
class LowRank(Codec):
    name = "lowrank"
    summary = ("The delta as a rank-r product B A: a truncated SVD of a full fine-tune, or a LoRA adapter's own factors "
               "(r x (rows + columns) floats per matrix).")
    options = (
        ParamSpec("rank", int, 32, low=1, high=MAX_RANK, doc="the most factors kept (truncated SVD)"),
        ParamSpec("scale", float, 1.0, low=-MAX_SCALE, high=MAX_SCALE, doc="the product's factor (an adapter's lora_alpha / r)"),
        ParamSpec("transposed", bool, False, doc="the tensor is (B A) transposed (embeddings, fan-in-fan-out layers)"),
    )

    def encode(self, name, base, expert, opts):
        if expert.dim() != 2:
            raise UserInputError(f"lowrank: tensor {name} is not a matrix")
        delta = _delta(base, expert).view(expert.shape)
        rank = min(opts["rank"], *delta.shape)
        u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)  # the best rank-r approximation (Eckart-Young)
        b, a = u[:, :rank] * sigma[:rank], vh[:rank]
        if opts["transposed"]:
            b, a = a.T, b.T
        return {"a": a.contiguous().to(torch.float32), "b": b.contiguous().to(torch.float32)}

    def decode(self, base, parts, dtype, shape, opts, out=None):
        rows_of = self._rows(parts, shape, opts)
        cols = shape[1]

        def delta_at(start: int, stop: int) -> torch.Tensor:
            first, last = start // cols, -(-stop // cols)
            return rows_of(first, last).reshape(-1)[start - first * cols : stop - first * cols]

        return _rebuild(base, dtype, shape, delta_at, out)

    def squares(self, parts, shape, opts):
        """||scale B A||^2 = scale^2 sum_kl (B^T B)_kl (A A^T)_kl, from the r x r Gram
        matrices (exact dots, fixed order): r^2 (rows + cols) work instead of a decode's
        r rows cols. The norm of the exact product, before its entries round to float32."""
        b, a = self._factors(parts, shape, opts)
        rank = a.shape[0]
        left = [exact.dot(b[:, k : k + 1], b, dim=0) for k in range(rank)]  # row k of B^T B
        right = [exact.dot(a[k : k + 1], a, dim=1) for k in range(rank)]  # row k of A A^T
        total = opts["scale"] ** 2 * math.fsum(x for k in range(rank) for x in (left[k] * right[k]).tolist())
        if not math.isfinite(total):
            raise UserInputError("lowrank delta: its squared norm overflows")
        return total

    @classmethod
    def _rows(cls, parts: Parts, shape, opts) -> Callable[[int, int], torch.Tensor]:
        """Rows ``i .. j-1`` of the delta in float32."""
        b, a = cls._factors(parts, shape, opts)
        return lambda i, j: exact.lowrank_rows(b, a, opts["scale"], opts["transposed"], i, j).to(torch.float32)

    @staticmethod
    def _factors(parts: Parts, shape, opts) -> tuple[torch.Tensor, torch.Tensor]:
        """B (rows x r) and A (r x cols), after checking their sizes, dtype and values."""
        if len(shape) != 2:
            raise UserInputError(f"lowrank delta: a tensor of shape {list(shape)} is not a matrix")
        # B A is (rows, cols), or (cols, rows) when the tensor is its transpose
        rows, cols = (shape[1], shape[0]) if opts["transposed"] else tuple(shape)
        rank = parts["b"].numel() // rows if rows else 0
        if not 1 <= rank <= min(opts["rank"], rows, cols) or parts["b"].numel() != rows * rank:
            raise UserInputError(f"lowrank delta: part b has {parts['b'].numel()} entries, not rows x a rank up to {opts['rank']}")
        _expect(parts, "a", rank * cols, "lowrank")
        if parts["a"].dtype != torch.float32 or parts["b"].dtype != torch.float32:
            raise UserInputError(f"lowrank delta: factors are {parts['a'].dtype} and {parts['b'].dtype}, float32 expected")
        _finite(parts, "lowrank", "a", "b")
        return parts["b"].reshape(rows, rank), parts["a"].reshape(rank, cols)


DEFAULT_CODEC = "ternary"


def parse_codec(spec: str) -> tuple[Codec, dict[str, Any]]:
    """``NAME`` or ``NAME:key=value,...`` -> (codec, full options with defaults)."""
    name, _, rest = spec.partition(":")
    codec = CODECS.get(name)
    if codec is None or name == "same":
        choices = sorted(n for n in CODECS if n != "same")
        raise UserInputError(f"--codec: unknown codec {name!r}; expected one of {choices}")
    given: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, raw = item.partition("=")
        spec_ = next((o for o in codec.options if o.name == key), None)
        if spec_ is None or not eq:
            raise UserInputError(f"--codec {name}: unknown option {item!r}; options: {[o.name for o in codec.options]}")
        given[key] = _convert(spec_, raw)
    return codec, check_options(codec, given, f"--codec {name}")


def _convert(spec: ParamSpec, raw: str) -> Any:
    try:
        if spec.kind is bool:
            return raw.lower() in ("1", "true", "yes")
        return spec.kind(raw) if spec.kind is not str else raw
    except ValueError:
        raise UserInputError(f"codec option {spec.name}: {raw!r} is not a {spec.kind.__name__}") from None


def check_options(codec: Codec, given: Any, where: str) -> dict[str, Any]:
    """Validated options with defaults filled in (options also arrive from delta manifests)."""
    if not isinstance(given, dict):
        raise UserInputError(f"{where}: codec options must be a mapping")
    errors: list[str] = []
    unknown = set(given) - {o.name for o in codec.options}
    if unknown:
        errors.append(f"{where}: unknown options {sorted(unknown)}")
    full = {}
    for spec in codec.options:
        value = given.get(spec.name, spec.default)
        spec.check_scalar(value, f"{where}.{spec.name}", errors)
        full[spec.name] = value
    if errors:
        raise UserInputError("; ".join(errors))
    return full
