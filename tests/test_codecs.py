"""Delta codecs on synthetic tensors, against values worked out by hand in the test.

Each codec is driven through its ``encode``/``decode`` (the parts it stores are checked
too), and ``lossless`` also through whole delta files: extract, then apply, must give
back the expert's bytes exactly for every float dtype and for mixed base/expert dtypes.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from delta_fixtures import load_dir_tensors, save_model

from hivemerge.merge.deltas.codecs import CODECS, DEFAULT_CODEC, parse_codec
from hivemerge.merge.deltas.delta import DeltaFile, apply_delta, extract_delta
from hivemerge.merge.io.manifest import model_id
from hivemerge.merge.io.sources import SafetensorsModel
from hivemerge.merge.numerics import rng
from hivemerge.merge.numerics.bits import count_bits, pack_bits, signed_bits, unpack_bits
from hivemerge.protocol.errors import UserInputError
from hivemerge.protocol.identity import Identity

BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


def pair(n: int, dtype=torch.float32, scale: float = 0.01, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    expert = base + torch.randn(n, generator=g) * scale
    return base.to(dtype), expert.to(dtype)


def roundtrip(spec: str, base: torch.Tensor, expert: torch.Tensor, name: str = "t"):
    codec, opts = parse_codec(spec)
    parts = codec.encode(name, base, expert, opts)
    decoded = codec.decode(base, parts, expert.dtype, tuple(expert.shape), opts)
    assert decoded.dtype == expert.dtype and decoded.shape == expert.shape
    return parts, decoded, opts


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(BITS[a.dtype]), b.reshape(-1).view(BITS[b.dtype]))


# -- lossless -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_lossless_gives_back_every_bit_pattern(dtype):
    # Random bit patterns: subnormals, -0.0, Inf and NaN payloads included.
    g = torch.Generator().manual_seed(1)
    bits = BITS[dtype]
    info = torch.iinfo(bits)
    base = torch.randint(info.min, info.max, (3, 257), generator=g, dtype=torch.int64).to(bits).view(dtype)
    expert = torch.randint(info.min, info.max, (3, 257), generator=g, dtype=torch.int64).to(bits).view(dtype)
    expert[0, :5] = base[0, :5]
    parts, decoded, _ = roundtrip("lossless", base, expert)
    assert list(parts) == ["xor"] and parts["xor"].dtype == bits
    assert same_bits(decoded, expert)


@pytest.mark.parametrize("base_dtype,expert_dtype", [
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16), (torch.float16, torch.float32),
])
def test_lossless_mixed_dtypes_store_the_expert_raw(base_dtype, expert_dtype):
    base, expert = pair(300)
    base, expert = base.to(base_dtype), expert.to(expert_dtype)
    parts, decoded, _ = roundtrip("lossless", base, expert)
    assert list(parts) == ["raw"] and parts["raw"].dtype == expert_dtype
    assert same_bits(decoded, expert)


def _dtype_family(root, base_dtype, expert_dtype):
    g = torch.Generator().manual_seed(3)
    base = {
        "model.embed_tokens.weight": torch.randn(24, 16, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(32, 16, generator=g),
    }
    expert = {n: t + torch.randn(t.shape, generator=g) * 0.01 for n, t in base.items()}
    expert["model.layers.1.mlp.up_proj.weight"] = base["model.layers.1.mlp.up_proj.weight"].clone()  # unchanged
    base = {n: t.to(base_dtype) for n, t in base.items()}
    expert = {n: t.to(expert_dtype) for n, t in expert.items()}
    base["position_ids"] = expert["position_ids"] = torch.arange(64)  # an integer buffer
    return save_model(root / "base", base), save_model(root / "expert", expert)


def _sha_per_tensor(directory) -> dict[str, str]:
    model = SafetensorsModel(directory)
    return {n: hashlib.sha256(model.raw_bytes(n)).hexdigest() for n in model.names()}


@pytest.mark.parametrize("base_dtype,expert_dtype", [
    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16),
])
def test_lossless_delta_file_rebuilds_the_expert_exactly(tmp_path, base_dtype, expert_dtype):
    base_dir, expert_dir = _dtype_family(tmp_path, base_dtype, expert_dtype)
    report = extract_delta(base_dir, expert_dir, tmp_path / "d.delta.safetensors", Identity.generate(), "lossless")
    assert report.base_id == model_id(SafetensorsModel(base_dir))
    assert report.expert_id == model_id(SafetensorsModel(expert_dir))
    if base_dtype == expert_dtype:
        # The unchanged tensor and the integer buffer are stored as 'same'.
        assert report.codecs == {"lossless": 3, "same": 2}
    summary = apply_delta(base_dir, tmp_path / "d.delta.safetensors", tmp_path / "rebuilt")
    assert summary["exact"] is True
    assert summary["rebuilt_id"] == summary["expert_id"] == report.expert_id
    assert _sha_per_tensor(tmp_path / "rebuilt") == _sha_per_tensor(expert_dir)
    for fname in ("config.json", "tokenizer_config.json"):
        assert (tmp_path / "rebuilt" / fname).read_bytes() == (expert_dir / fname).read_bytes()


def test_lossless_when_expert_bytes_equal_the_base_bytes_of_another_dtype(tmp_path):
    """A bf16 expert tensor whose bytes happen to equal its fp16 base tensor's bytes is
    not the same tensor: 0x3C00 is 1.0 in fp16 and 0.0078125 in bf16."""
    bits = torch.full((8, 8), 0x3C00, dtype=torch.int16)
    base_dir = save_model(tmp_path / "base", {"w": bits.view(torch.float16), "v": torch.ones(8, dtype=torch.float16)})
    expert_dir = save_model(tmp_path / "expert", {"w": bits.view(torch.bfloat16), "v": torch.ones(8, dtype=torch.float16)})
    extract_delta(base_dir, expert_dir, tmp_path / "d.delta.safetensors", Identity.generate(), "lossless")
    summary = apply_delta(base_dir, tmp_path / "d.delta.safetensors", tmp_path / "rebuilt")
    assert summary["exact"] is True
    rebuilt = load_dir_tensors(tmp_path / "rebuilt")["w"]
    assert rebuilt.dtype == torch.bfloat16 and rebuilt[0, 0].item() == 0.0078125


# -- fp16 ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fp16_error_is_the_fp16_rounding_of_the_delta(dtype):
    base, expert = pair(2000, dtype)
    parts, decoded, _ = roundtrip("fp16", base, expert)
    delta = expert.float() - base.float()
    half = delta.to(torch.float16)
    assert torch.equal(parts["delta"], half)
    by_hand = (base.float() + half.float()).to(dtype)
    assert torch.equal(decoded, by_hand)
    rounding = (half.float() - delta).abs()
    assert (rounding <= delta.abs() * 2**-11 + 2**-25).all()  # fp16: half an ulp (normal or subnormal)
    if dtype == torch.float32:
        slack = 2 * torch.finfo(torch.float32).eps * (base.abs() + expert.abs())
        assert ((decoded - expert).abs() <= rounding + slack).all()
        assert (decoded - expert).abs().max() > 0  # it is lossy


def test_fp16_keeps_float32_where_fp16_overflows():
    base, expert = pair(64)
    expert[3] = base[3] + 1e6
    parts, decoded, _ = roundtrip("fp16", base, expert)
    assert parts["delta"].dtype == torch.float32
    assert torch.equal(decoded, base + (expert - base))


# -- int8 ---------------------------------------------------------------------------

@pytest.mark.parametrize("magnitude", [1e-1, 1e-2, 1e-3, 1e-4, 1e-6])
@pytest.mark.parametrize("block", [64, 24])
def test_int8_blockwise_error_is_at_most_half_a_scale(magnitude, block):
    n = 1000  # not a multiple of the block: the last block is partial
    base, expert = pair(n, scale=magnitude, seed=5)
    parts, decoded, opts = roundtrip(f"int8:block={block}", base, expert)
    assert opts == {"block": block}
    delta = expert - base
    blocks = torch.cat([delta, delta.new_zeros(-n % block)]).view(-1, block)
    absmax = blocks.abs().amax(1)
    scale = (absmax / 127).to(parts["scale"].dtype)  # by hand, in the dtype it is stored in
    assert torch.equal(parts["scale"], scale)
    assert (scale > 0).all()  # no block of a nonzero delta is flattened to zero
    s = scale.float().unsqueeze(1)
    q = torch.round(blocks / s).clamp(-127, 127).to(torch.int8)
    assert torch.equal(parts["q"], q.reshape(-1))
    assert parts["q"].numel() == blocks.numel()
    dequantized = (q.float() * s).reshape(-1)[:n]
    per_weight_scale = s.expand(-1, block).reshape(-1)[:n]
    # Half a step, up to float32 rounding of the division.
    assert ((dequantized - delta).abs() <= per_weight_scale * (0.5 + 1e-5)).all()
    assert torch.equal(decoded, base + dequantized)


def test_int8_zero_delta_block_decodes_to_the_base():
    base, expert = pair(128)
    expert[:64] = base[:64]
    parts, decoded, _ = roundtrip("int8", base, expert)
    assert parts["scale"][0] == 0 and (parts["q"][:64] == 0).all()
    assert torch.equal(decoded[:64], base[:64])


# -- sparse ---------------------------------------------------------------------------

@pytest.mark.parametrize("density,n", [(0.1, 1000), (0.37, 777), (0.5, 64), (1.0, 50), (0.001, 100)])
def test_sparse_topk_keeps_exactly_the_largest_magnitudes(density, n):
    base, expert = pair(n, seed=11)
    parts, decoded, opts = roundtrip(f"sparse:density={density}", base, expert)
    assert opts["select"] == "topk" and opts["values"] == "fp16"
    delta = expert - base
    k = max(1, round(density * n))
    kept = unpack_bits(parts["mask"], n)
    assert int(kept.sum()) == k
    assert parts["values"].numel() == k and parts["values"].dtype == torch.float16
    largest = set(torch.topk(delta.abs(), k).indices.tolist())  # magnitudes are distinct here
    assert set(torch.nonzero(kept).flatten().tolist()) == largest
    assert torch.equal(decoded[~kept], base[~kept])
    assert torch.equal(decoded[kept], base[kept] + delta[kept].half().float())


def test_sparse_topk_ties_are_broken_by_position():
    base = torch.zeros(10)
    expert = torch.tensor([1.0, -3.0, 2.0, 3.0, 2.0, -2.0, 0.5, 2.0, 0.0, 1.0])
    parts, decoded, _ = roundtrip("sparse:density=0.4", base, expert)
    # k = 4: both 3s, then the first two of the four |2|s (positions 2 and 4).
    assert torch.nonzero(unpack_bits(parts["mask"], 10)).flatten().tolist() == [1, 2, 3, 4]
    assert decoded.tolist() == [0.0, -3.0, 2.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("density", [0.1, 0.3, 0.9])
def test_sparse_dare_keeps_a_random_fraction_rescaled(density):
    n = 4096
    base, expert = pair(n, seed=13)
    parts, decoded, opts = roundtrip(f"sparse:select=dare,density={density},seed=7", base, expert, name="layers.0.w")
    delta = expert - base
    expected_mask = rng.bernoulli_mask(rng.stream_key(7, "layers.0.w", 0), n, density)
    kept = unpack_bits(parts["mask"], n)
    assert torch.equal(kept, expected_mask)
    fraction = kept.float().mean().item()
    sigma = (density * (1 - density) / n) ** 0.5
    assert abs(fraction - density) < 4 * sigma
    assert torch.equal(decoded[~kept], base[~kept])
    assert torch.equal(decoded[kept], base[kept] + (delta[kept] / density).half().float())
    # Deterministic per (seed, tensor name); another seed or name draws another mask.
    again, _, _ = roundtrip(f"sparse:select=dare,density={density},seed=7", base, expert, name="layers.0.w")
    assert torch.equal(again["mask"], parts["mask"])
    other, _, _ = roundtrip(f"sparse:select=dare,density={density},seed=8", base, expert, name="layers.0.w")
    assert not torch.equal(other["mask"], parts["mask"])


def test_sparse_int8_values_are_quantized_per_block():
    n = 2000
    base, expert = pair(n, seed=17)
    parts, decoded, _ = roundtrip("sparse:density=0.2,values=int8,block=32", base, expert)
    delta = expert - base
    kept = unpack_bits(parts["mask"], n)
    k = round(0.2 * n)
    assert int(kept.sum()) == k and "values" not in parts
    values = delta[kept]
    blocks = torch.cat([values, values.new_zeros(-k % 32)]).view(-1, 32)
    scale = (blocks.abs().amax(1) / 127).to(parts["scale"].dtype)
    assert torch.equal(parts["scale"], scale)
    per_value_scale = scale.float().repeat_interleave(32)[:k]
    assert ((decoded[kept] - expert[kept]).abs() <= per_value_scale * (0.5 + 1e-5) + 1e-6).all()
    assert torch.equal(decoded[~kept], base[~kept])


# -- sign1 ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,block", [(1024, 128), (1000, 128), (100, 8), (5, 8)])
def test_sign1_is_sign_times_mean_magnitude_per_block(n, block):
    base, expert = pair(n, seed=19)
    parts, decoded, _ = roundtrip(f"sign1:block={block}", base, expert)
    delta = (expert - base).double()
    assert (delta != 0).all()
    blocks = [delta[i : i + block] for i in range(0, n, block)]  # the last block may be partial
    means = torch.stack([b.abs().sum() / b.numel() for b in blocks]).to(torch.float16)
    assert torch.equal(parts["scale"], means)
    assert torch.equal(unpack_bits(parts["signs"], n), delta > 0)
    per_weight = means.float().repeat_interleave(block)[:n]
    assert torch.equal(decoded, base + torch.sign(delta).float() * per_weight)


def test_default_codec_is_ternary():
    assert DEFAULT_CODEC == "ternary" and parse_codec("ternary")[1] == {"block": 256, "threshold": 0.8}


# -- ternary --------------------------------------------------------------------------

@pytest.mark.parametrize("n,block", [(1024, 256), (1000, 256), (100, 8), (5, 8)])
def test_ternary_keeps_entries_above_threshold_sigma_at_their_mean_magnitude(n, block):
    base, expert = pair(n, seed=23)
    parts, decoded, _ = roundtrip(f"ternary:block={block},threshold=0.7", base, expert)
    delta = (expert.double() - base.double())
    want = torch.zeros(n, dtype=torch.float64)
    keep_all, scales = [], []
    for i in range(0, n, block):  # by hand, block by block; the last block may be partial
        d = (expert[i : i + block].float() - base[i : i + block].float()).double()
        sigma = d.abs().sum() / d.numel() * math.sqrt(math.pi / 2)
        keep = d.abs() > float((sigma * 0.7).float())
        scale = (d.abs()[keep].sum() / max(int(keep.sum()), 1)).to(torch.bfloat16)
        keep_all.append(keep)
        scales.append(scale)
        want[i : i + block] = torch.where(keep, torch.sign(d) * scale.double(), 0.0)
    keep = torch.cat(keep_all)
    assert torch.equal(parts["scale"], torch.stack(scales))
    assert torch.equal(unpack_bits(parts["mask"], n), keep)
    assert torch.equal(unpack_bits(parts["signs"], int(keep.sum())), delta[keep] >= 0)
    assert torch.equal(decoded, (base.float() + want.float()).to(expert.dtype))
    assert 0.3 < keep.float().mean() < 0.7  # a Gaussian keeps ~48% above 0.7 sigma


# -- bits -----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1001])
def test_pack_bits_round_trip(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)


def test_pack_bits_is_little_endian_within_a_byte():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b00000001, 0b10000010, 0b00000001]
    assert unpack_bits(torch.tensor([0xFF, 0x80], dtype=torch.uint8), 16).tolist() == [True] * 8 + [False] * 7 + [True]


def test_count_bits_counts_only_the_first_count_bits():
    packed = torch.tensor([0b10110001, 0xFF, 0b11111101], dtype=torch.uint8)
    assert [count_bits(packed, n) for n in (0, 1, 4, 8, 9, 16, 17, 18, 19, 24)] == [0, 1, 1, 4, 5, 12, 13, 13, 14, 19]


def signed_reference(mask: list[bool], signs: list[bool]) -> list[int]:
    """By hand: each set mask bit takes the next sign bit (1: +1, 0: -1); clear bits are 0."""
    out, taken = [], 0
    for bit in mask:
        out.append((1 if signs[taken] else -1) if bit else 0)
        taken += bit
    return out


def test_signed_bits_by_hand():
    mask = torch.tensor([0b00000101, 0b10000000], dtype=torch.uint8)  # entries 0, 2 and 15 kept
    signs = torch.tensor([0b110], dtype=torch.uint8)  # their signs: -, +, +
    values, kept = signed_bits(mask, signs, 0, 16, 0)
    assert values.tolist() == [-1, 0, 1] + [0] * 12 + [1] and kept == 3
    values, kept = signed_bits(mask, signs, 8, 8, 2)  # the second byte alone, two signs used before it
    assert values.tolist() == [0] * 7 + [1] and kept == 3


@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 1001])
@pytest.mark.parametrize("density", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("span", [8, 24, 1 << 20])
def test_signed_bits_span_by_span_match_the_reference_and_ignore_padding_bits(n, density, span):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < density
    signs = torch.rand(int(mask.sum()), generator=g) < 0.5
    packed = pack_bits(mask)
    if n % 8:  # a hostile writer sets the bits past the last entry: they are no entries
        packed[-1] |= 0xFF ^ ((1 << n % 8) - 1)
    values, taken = [], 0
    for start in range(0, n, span):
        got, taken = signed_bits(packed, pack_bits(signs), start, min(n, start + span) - start, taken)
        values += got.tolist()
    assert values == signed_reference(mask.tolist(), signs.tolist()) and taken == int(mask.sum())
    assert count_bits(packed, n) == int(mask.sum())


# -- codec names and options ------------------------------------------------------------

def test_parse_codec_fills_defaults_and_converts_values():
    codec, opts = parse_codec("sparse:density=0.05,values=int8")
    assert codec is CODECS["sparse"]
    assert opts == {"density": 0.05, "select": "topk", "values": "int8", "seed": 0, "block": 64}
    assert parse_codec("lossless") == (CODECS["lossless"], {})


@pytest.mark.parametrize("spec,fragment", [
    ("nope", "unknown codec 'nope'"),
    ("same", "unknown codec 'same'"),
    ("sparse:density=2", "density: must be in (0, 1], got 2.0"),
    ("sparse:density=0", "density: must be in (0, 1], got 0.0"),
    ("sparse:density=abc", "'abc' is not a float"),
    ("sparse:select=random", "must be one of ['topk', 'dare']"),
    ("int8:block=4", "block: must be in [8, 1.04858e+06], got 4"),
    ("int8:blocks=64", "unknown option 'blocks=64'"),
    ("fp16:block=64", "unknown option 'block=64'"),
    ("int8:block", "unknown option 'block'"),
])
def test_parse_codec_rejects_bad_names_and_options(spec, fragment):
    with pytest.raises(UserInputError) as info:
        parse_codec(spec)
    assert fragment in str(info.value)


# -- codecs through delta files ------------------------------------------------------------

def test_lossy_codecs_keep_1d_tensors_in_fp16_and_record_their_choice(tmp_path):
    base_dir, expert_dir = _dtype_family(tmp_path, torch.float32, torch.float32)
    for spec, main in [("int8", "int8"), ("sign1:block=64", "sign1"), ("sparse:density=0.25", "sparse")]:
        out = tmp_path / f"{main}.delta.safetensors"
        report = extract_delta(base_dir, expert_dir, out, Identity.generate(), spec)
        assert report.codecs == {main: 2, "fp16": 1, "same": 2}, spec
        delta = DeltaFile(out)
        entry = delta.manifest["tensors"]["model.layers.0.input_layernorm.weight"]
        assert entry["codec"] == "fp16" and entry["params"] == {}
        assert delta.manifest["tensors"]["model.embed_tokens.weight"]["params"] == parse_codec(spec)[1]
        summary = apply_delta(base_dir, out, tmp_path / f"rebuilt-{main}")
        assert summary["exact"] is False and summary["rebuilt_id"] != summary["expert_id"]
        rebuilt, expert = load_dir_tensors(tmp_path / f"rebuilt-{main}"), load_dir_tensors(expert_dir)
        assert torch.equal(rebuilt["position_ids"], expert["position_ids"])
        assert torch.equal(rebuilt["model.layers.1.mlp.up_proj.weight"], expert["model.layers.1.mlp.up_proj.weight"])


LOSSY_SPECS = ["ternary", "ternary:block=100,threshold=0.5", "sign1:block=96", "int8:block=50", "fp16",
               "sparse:density=0.1", "sparse:density=0.3,select=dare,values=int8"]


@pytest.mark.parametrize("spec", LOSSY_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decoding_a_span_at_a_time_gives_the_whole_tensors_bytes(monkeypatch, spec, dtype):
    """Decodes go a span at a time (bounded float32 temporaries, issue 21). Spans of 8
    entries (blocks of 50, 96 and 100 straddle them) and of 2**20 give the bytes of the
    whole-tensor formula, written here as the codecs first wrote it."""
    from hivemerge.merge.deltas import codecs

    g = torch.Generator().manual_seed(7)
    n = 4099
    base = (torch.randn(n, generator=g) * 0.05).to(dtype)
    expert = (base.float() + torch.randn(n, generator=g) * 0.003).to(dtype)
    codec, opts = parse_codec(spec)
    parts = codec.encode("w", base, expert, opts)
    want = (base.float() + whole_delta(codec.name, parts, n, opts)).to(dtype)
    for span in (8, 1 << 20):
        monkeypatch.setattr(codecs, "_DECODE_SPAN", span)
        got = codec.decode(base, parts, dtype, (n,), opts)
        assert torch.equal(got.view(torch.uint8 if dtype == torch.float32 else torch.int16).view(-1),
                           want.view(torch.uint8 if dtype == torch.float32 else torch.int16).view(-1)), (spec, span)
    scratch = base.clone()  # decoded over the base's own copy (a merge's read buffer): the same bytes, no new tensor
    got = codec.decode(scratch, parts, dtype, (n,), opts, out=scratch)
    assert got.data_ptr() == scratch.data_ptr() and torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))


def whole_delta(name: str, parts: dict, n: int, opts: dict) -> torch.Tensor:
    """Each lossy codec's delta in float32, decoded whole."""
    if name == "fp16":
        return parts["delta"].float()
    if name == "int8":
        return (parts["q"].float().view(-1, opts["block"]) * parts["scale"].float().unsqueeze(1)).reshape(-1)[:n]
    if name == "sign1":
        scale = parts["scale"].float().repeat_interleave(opts["block"])[:n]
        return torch.where(unpack_bits(parts["signs"], n), scale, -scale)
    keep = unpack_bits(parts["mask"], n)
    delta = torch.zeros(n)
    if name == "ternary":
        magnitude = parts["scale"].float().repeat_interleave(opts["block"])[:n][keep]
        delta[keep] = torch.where(unpack_bits(parts["signs"], int(keep.sum())), magnitude, -magnitude)
    elif "values" in parts:
        delta[keep] = parts["values"].float()
    else:
        count = int(keep.sum())
        delta[keep] = (parts["q"].float().view(-1, opts["block"]) * parts["scale"].float().unsqueeze(1)).reshape(-1)[:count]
    return delta


@pytest.mark.parametrize("spec, part", [("ternary", "scale"), ("ternary", "mask"), ("sign1", "signs"), ("int8:block=50", "q")])
def test_a_part_of_the_wrong_size_is_refused(spec, part):
    base = torch.zeros(1000)
    codec, opts = parse_codec(spec)
    parts = codec.encode("w", base, base + 0.01 * torch.randn(1000), opts)
    parts[part] = torch.cat([parts[part], parts[part][:1]])  # one entry too many: accepted silently before
    with pytest.raises(UserInputError, match=f"part {part} has"):
        codec.decode(base, parts, torch.float32, (1000,), opts)


@pytest.mark.parametrize("spec", ["ternary", "ternary:block=100,threshold=0.5", "ternary:block=8,threshold=0"])
def test_ternary_encodes_a_span_of_whole_blocks_at_a_time_with_the_same_bytes(monkeypatch, spec):
    """Encoding goes a span of whole blocks at a time (a 1.1B expert's publish peaked at
    2.1 GB, issue 21): spans of one 8-block group and of 2**20 entries give the same parts."""
    from hivemerge.merge.deltas import codecs

    g = torch.Generator().manual_seed(9)
    base = (torch.randn(5003, generator=g) * 0.05).bfloat16()
    expert = (base.float() + torch.randn(5003, generator=g) * 0.003).bfloat16()
    codec, opts = parse_codec(spec)
    whole = codec.encode("w", base, expert, opts)
    monkeypatch.setattr(codecs, "_DECODE_SPAN", 1)  # the smallest span: 8 blocks
    small = codec.encode("w", base, expert, opts)
    assert whole.keys() == small.keys() and all(torch.equal(whole[k], small[k]) for k in whole)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 255, 256, 257, 4099])
def test_kept_entries_per_block_are_counted_by_byte_with_padding_bits_ignored(n):
    """Screening counts a ternary delta's kept entries per block from mask bytes; a mask
    whose last byte has its padding bits set (a hostile writer) counts as written."""
    from hivemerge.merge.numerics.bits import count_bits_per_group

    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.4
    packed = pack_bits(keep)
    if n % 8:
        packed[-1] |= 0xFF ^ ((1 << (n % 8)) - 1)
    for group in (8, 16, 256):
        want = torch.cat([keep, keep.new_zeros(-n % group)]).view(-1, group).sum(1)
        assert torch.equal(count_bits_per_group(packed, n, group), want), group
    with pytest.raises(ValueError):
        count_bits_per_group(packed, n, 12)
