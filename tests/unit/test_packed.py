"""Packed top-k codecs (topk+q8/q4/q2): exact index round trips, bounded value error, exact error feedback,
small blobs, and strict refusal of malformed payloads with the blob and the problem named."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import blobs, packing
from pipeline.codecs import PACKED_BITS, CodecConfig, CodecError, decode, encode

WHERE = "jobs/abc/grads/v3/s1.blob"
HYP = settings(max_examples=40, deadline=None)
PACKED = tuple(PACKED_BITS)
DIGITS = {"conv1.weight": (16, 1, 3, 3), "conv1.bias": (16,), "conv2.weight": (32, 16, 3, 3), "conv2.bias": (32,),
          "fc1.weight": (64, 512), "fc1.bias": (64,), "fc2.weight": (10, 64), "fc2.bias": (10,)}


def randn(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def shapes_of(g: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in g.items()}


# ---------------------------------------------------------------- building blocks


@given(n=st.integers(0, 2**63 - 1))
def test_varints_round_trip(n: int) -> None:
    r = packing.Reader(packing.varint(n))
    assert r.varint("n") == n and r.left() == 0


@given(bits=st.integers(1, 31), values=st.lists(st.integers(0, 2**31 - 1), max_size=50))
def test_bit_fields_round_trip(bits: int, values: list[int]) -> None:
    fields = np.array([v % (1 << bits) for v in values], dtype=np.int64)
    data = packing.pack_bits(fields, bits)
    assert len(data) == math.ceil(len(values) * bits / 8)
    assert packing.unpack_bits(packing.Reader(data), len(values), bits, "f").tolist() == fields.tolist()


@HYP
@given(numel=st.integers(1, 200_000), seed=st.integers(0, 2**31 - 1), frac=st.floats(0.00001, 1.0))
def test_gap_coded_indices_round_trip_exactly_including_long_gaps(numel: int, seed: int, frac: float) -> None:
    rng = np.random.default_rng(seed)
    k = max(1, min(numel, int(frac * numel)))
    idx = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)
    for r in (0, packing.gap_bits(idx, numel)):  # r = 0 forces the 255-escape path on gaps ≥ 255
        high, low = packing.encode_indices(idx, r)
        rd = packing.Reader(high + low)
        assert packing.decode_indices(rd, k, r, numel, "t").tolist() == idx.tolist()
        assert rd.left() == 0


@pytest.mark.parametrize("density", [0.001, 0.01, 0.03])
def test_an_index_costs_about_log2_of_the_inverse_density_bits_after_zstd(density: float) -> None:
    import zstandard

    numel = 1_000_000
    k = int(density * numel)
    idx = np.sort(np.random.default_rng(0).choice(numel, size=k, replace=False))
    high, low = packing.encode_indices(idx, packing.gap_bits(idx, numel))
    bits_each = 8 * len(zstandard.ZstdCompressor(level=3).compress(high + low)) / k
    entropy = math.log2(math.e / density)  # of a geometric gap with mean 1/density
    assert bits_each < entropy + 1.0  # int16/int32 indices cost 16/32 bits


# ---------------------------------------------------------------- the codecs


@pytest.mark.parametrize("name", PACKED)
@HYP
@given(seed=st.integers(0, 2**31 - 1), density=st.floats(0.001, 1.0),
       shapes=st.lists(st.lists(st.integers(0, 30), max_size=3), min_size=1, max_size=3))
def test_packed_codecs_send_the_largest_values_within_their_bits_and_feed_the_rest_back(
    name: str, seed: int, density: float, shapes: list[list[int]]
) -> None:
    gen = torch.Generator().manual_seed(seed)
    grads = {f"l{i}.w": torch.randn(tuple(s), generator=gen) * 10.0 ** (i - 1) for i, s in enumerate(shapes)}
    enc = encode(grads, CodecConfig(name, density=density))
    out = decode(enc.tensors, enc.meta, WHERE, expected_shapes=shapes_of(grads))
    assert list(out) == list(grads) and enc.residual is not None
    levels = 1 << (PACKED_BITS[name] - 1)
    for key, x in grads.items():
        d, flat = out[key].flatten(), x.flatten()
        assert out[key].shape == x.shape and out[key].dtype == torch.float32
        assert torch.equal(enc.residual[key], x - out[key])  # error feedback carries exactly what was lost
        sent = d != 0
        assert int(sent.sum()) <= min(math.ceil(density * flat.numel()), flat.numel())
        if not bool(sent.any()):
            continue
        assert bool((torch.sign(d[sent]) == torch.sign(flat[sent])).all())
        hi = float(flat[sent].abs().max())
        lo = float(flat[sent].abs().min())
        step = (hi - lo) / (levels - 1) if levels > 1 else hi
        assert bool(((d[sent] - flat[sent]).abs() <= step / 2 + hi * 2**-7 + 1e-30).all())
        if bool((~sent).any()):  # nothing dropped was larger than what was sent (ties aside)
            assert float(flat[~sent].abs().max()) <= hi


def test_every_input_is_delivered_eventually_through_packed_codecs() -> None:
    for name in PACKED:
        gen = torch.Generator().manual_seed(1)
        total_in, total_sent = torch.zeros(40, 9, dtype=torch.float64), torch.zeros(40, 9, dtype=torch.float64)
        residual = velocity = None
        cfg = CodecConfig(name, density=0.05, momentum=0.0)
        for _ in range(30):
            g = {"w": torch.randn(40, 9, generator=gen)}
            enc = encode(g, cfg, residual, velocity)
            residual = enc.residual
            total_in += g["w"].double()
            total_sent += decode(enc.tensors, enc.meta, WHERE)["w"].double()
        assert residual is not None
        assert torch.allclose(total_sent + residual["w"].double(), total_in, atol=1e-4)


def test_momentum_correction_masks_the_velocity_where_packed_values_were_sent() -> None:
    enc = encode({"w": torch.tensor([4.0, 1.0, -0.5, 0.1])}, CodecConfig("topk+q8", density=0.5, momentum=0.9))
    assert enc.velocity is not None
    assert torch.equal(enc.velocity["w"], torch.tensor([0.0, 0.0, -0.5, 0.1]))


def test_a_packed_blob_is_a_fraction_of_a_legacy_topk_blob_on_a_small_model() -> None:
    grads = randn(DIGITS)
    meta = {"kind": "gradient", "job": "0123456789abcdef0123456789abcdef", "shard": 0, "base_version": 57}
    size = {}
    for name in ("topk", *PACKED):
        enc = encode(grads, CodecConfig(name, density=0.01))
        size[name] = len(blobs.encode(enc.tensors, {**meta, "codec": enc.meta}, compress=True))
        assert set(enc.tensors) == ({"packed"} if name in PACKED else set(enc.tensors))
    assert size["topk+q8"] < 0.5 * size["topk"]
    assert size["topk+q2"] < size["topk+q4"] < size["topk+q8"] < 1500
    assert encode(grads, CodecConfig("topk+q8", density=0.01)).meta == {"codec": "topk+q8", "format": 2,
                                                                        "density": 0.01}


def test_values_of_one_magnitude_and_zero_tensors_survive() -> None:
    grads = {"same": torch.tensor([2.0, -2.0, 2.0, 0.0]), "zero": torch.zeros(3, 2), "empty": torch.zeros(0, 5)}
    for name in PACKED:
        enc = encode(grads, CodecConfig(name, density=0.75))
        out = decode(enc.tensors, enc.meta, WHERE)
        assert out["same"].tolist() == [2.0, -2.0, 2.0, 0.0]
        assert torch.equal(out["zero"], grads["zero"]) and out["empty"].shape == (0, 5)


# ---------------------------------------------------------------- refusals


def _payload(name: str = "topk+q4") -> tuple[bytes, dict]:
    enc = encode({"w": torch.randn(12, 5, generator=torch.Generator().manual_seed(3))}, CodecConfig(name, density=0.2))
    return enc.tensors["packed"].numpy().tobytes(), enc.meta


def _decode(raw: bytes, meta: dict, shapes: dict | None = None) -> dict[str, torch.Tensor]:
    t = torch.tensor(list(raw), dtype=torch.uint8)  # (n,); frombuffer refuses an empty buffer
    return decode({"packed": t}, meta, WHERE, shapes)


def _layout_bytes(name: str, shape: tuple[int, ...], k: int, r: int, lo: float, hi: float) -> bytes:
    bf = torch.tensor([lo, hi], dtype=torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    dims = b"".join(packing.varint(d) for d in shape)
    return (packing.varint(len(name.encode())) + name.encode() + packing.varint(len(shape)) + dims
            + packing.varint(k) + bytes([r]) + bf)


def test_every_truncation_of_a_packed_payload_is_refused_naming_the_blob() -> None:
    raw, meta = _payload()
    for n in range(len(raw)):
        with pytest.raises(CodecError, match=f"{WHERE}.*(truncated|after the last|points past|outside)"):
            _decode(raw[:n], meta)


MALFORMED = {
    "a trailing byte": (lambda raw: raw + b"\x00", "after the last tensor"),
    "k larger than the tensor": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 4, 0, 0.0, 1.0), "exceeds the limit 3"),
    "index bits of 32": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 1, 32, 0.0, 1.0), "r=32"),
    "lo above hi": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 1, 0, 2.0, 1.0), "lo ≤ hi"),
    "a NaN range": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 1, 0, 0.0, float("nan")), "finite"),
    "a negative range": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 1, 0, -1.0, 1.0), "0 ≤ lo"),
    "a name twice": (lambda raw: b"\x02" + _layout_bytes("w", (3,), 0, 0, 0.0, 0.0) * 2, "appears twice"),
    "a name that is not utf-8": (lambda raw: b"\x01\x01\xff" + _layout_bytes("w", (3,), 0, 0, 0.0, 0.0)[2:],
                                 "utf-8"),
    "an index past the end": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 1, 0, 1.0, 1.0) + b"\x03\x00",
                              "outside \\[0, 3\\)"),
    "a gap past the end": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 1, 0, 1.0, 1.0) + b"\xff\x00\x00",
                           "points past"),
    "non-zero padding bits": (lambda raw: b"\x01" + _layout_bytes("w", (3,), 1, 0, 1.0, 1.0) + b"\x00\x01",
                              "padding bits"),
    "a varint that never ends": (lambda raw: b"\xff" * 12, "varint longer"),
    "too many dimensions": (lambda raw: b"\x01\x01w\x11", "ndim"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_packed_payloads_are_refused_naming_the_problem(case: str) -> None:
    mutate, problem = MALFORMED[case]
    raw, meta = _payload()
    with pytest.raises(CodecError, match=f"packed topk\\+q4 payload of blob {WHERE} is malformed: .*{problem}"):
        _decode(mutate(raw), meta)


def test_a_packed_payload_with_the_wrong_tensors_format_or_dtype_is_refused() -> None:
    raw, meta = _payload()
    good = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    with pytest.raises(CodecError, match="expects one tensor 'packed'"):
        decode({"packed": good, "w.values": torch.zeros(1)}, meta, WHERE)
    with pytest.raises(CodecError, match="unsupported format 1"):
        decode({"packed": good}, {**meta, "format": 1}, WHERE)
    with pytest.raises(CodecError, match="1-D uint8"):
        decode({"packed": good.to(torch.int16)}, meta, WHERE)


def test_a_packed_blob_that_does_not_fit_the_model_is_refused_before_decoding() -> None:
    raw, meta = _payload()
    with pytest.raises(CodecError, match="does not fit the model"):
        _decode(raw, meta, {"v": (12, 5)})
    with pytest.raises(CodecError, match="the model's is \\(60,\\)"):
        _decode(raw, meta, {"w": (60,)})


@HYP
@given(pos=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_any_single_byte_change_decodes_to_a_finite_gradient_or_is_refused(pos: int, byte: int) -> None:
    raw, meta = _payload("topk+q2")
    bad = bytearray(raw)
    bad[pos % len(bad)] = byte
    try:
        out = _decode(bytes(bad), meta)
    except CodecError:
        return
    assert all(bool(torch.isfinite(t).all()) for t in out.values())


# ---------------------------------------------------------------- in a job spec


def test_a_spec_accepts_packed_codecs_and_moves_the_outer_momentum_to_the_workers_with_momentum_correction() -> None:
    from pipeline.spec import JobSpec

    spec = JobSpec.model_validate({"codec": "topk+q4", "codec_density": 0.03, "codec_momentum": 0.9, "local_steps": 8})
    assert (spec.momentum, spec.outer_momentum) == (0.0, 0.0)
    kept = JobSpec.model_validate({"codec": "topk+q2", "codec_momentum": 0.9, "local_steps": 8, "outer_momentum": 0.5})
    assert kept.outer_momentum == 0.5  # an explicit value wins
    assert JobSpec.model_validate({"codec": "topk+q8"}).outer_momentum == 0.9  # untouched without correction
    with pytest.raises(ValueError, match="top-k codec"):
        JobSpec.model_validate({"codec": "int8", "codec_momentum": 0.9})
