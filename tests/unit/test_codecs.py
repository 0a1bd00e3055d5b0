"""Gradient codecs: round trips within each codec's tolerance, error feedback, and strict decoding."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import blobs, codecs
from pipeline.codecs import CODECS, PACKED_BITS, CodecConfig, CodecError, decode, encode, encoded_nbytes

LEGACY = tuple(c for c in CODECS if c not in PACKED_BITS)  # one payload tensor per part; packed: test_packed.py

WHERE = "jobs/abc/grads/v3/s1.blob"
HYP = settings(max_examples=50, deadline=None)


@st.composite
def grad_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    """1–3 tensors of 0–3 dims (sizes 0–40), magnitudes from 1e-3 to 1e3, sometimes with exact zeros."""
    out = {}
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 40), min_size=0, max_size=3)))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        t = torch.randn(shape, generator=gen) * 10.0 ** draw(st.integers(-3, 3))
        if draw(st.booleans()):
            t = t * (torch.rand(shape, generator=gen) > 0.5)
        out[f"layer{i}.weight"] = t
    return out


def chunk_bound(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-element int8 error bound: half a quantisation step of the element's chunk, absmax/254, plus a few
    fp32 ulps of absmax for the rounding in x / scale and q · scale."""
    n = x.numel()
    padded = torch.zeros(-(-n // chunk) * chunk)
    padded[:n] = x.flatten()
    absmax = padded.view(-1, chunk).abs().amax(dim=1)
    return (absmax / 254 + absmax * 2**-20).repeat_interleave(chunk)[:n] + 1e-30


def shapes_of(g: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in g.items()}


def assert_topk_kept_the_largest(x: torch.Tensor, dense: torch.Tensor, enc: codecs.Encoded, key: str,
                                 density: float) -> None:
    idx = enc.tensors[f"{key}.indices"].long()
    k = codecs.topk_count(x.numel(), density)
    assert idx.numel() == k == enc.meta["tensors"][key]["k"]
    assert bool((idx[1:] > idx[:-1]).all())
    flat = x.flatten().abs()
    dropped = torch.ones(x.numel(), dtype=torch.bool)
    dropped[idx] = False
    if k and bool(dropped.any()):
        assert float(flat[idx].min()) >= float(flat[dropped].max())
    assert bool((dense.flatten()[dropped] == 0).all())


@pytest.mark.parametrize("name", LEGACY)
@HYP
@given(grads=grad_dicts(), density=st.floats(0.01, 1.0), chunk=st.integers(1, 64))
def test_every_codec_round_trips_random_tensors_within_its_tolerance(
    name: str, grads: dict[str, torch.Tensor], density: float, chunk: int
) -> None:
    cfg = CodecConfig(name, density=density, chunk=chunk)
    enc = encode(grads, cfg)
    out = decode(enc.tensors, enc.meta, WHERE, expected_shapes=shapes_of(grads))
    assert list(out) == list(grads)
    for key, x in grads.items():
        d = out[key]
        assert d.dtype == torch.float32 and d.shape == x.shape
        err = (d - x).abs()
        if name == "none":
            assert torch.equal(d, x)
        elif name == "fp16":  # 11-bit significand; subnormal spacing 2^-24
            assert bool((err <= x.abs() * 2**-11 + 2**-25).all())
        elif name == "bf16":  # 8-bit significand, fp32's exponent range
            assert bool((err <= x.abs() * 2**-8 + 1e-38).all())
        elif name == "int8":
            assert bool((err.flatten() <= chunk_bound(x, chunk)).all())
        else:
            assert_topk_kept_the_largest(x, d, enc, key, density)
            idx = enc.tensors[f"{key}.indices"].long()
            kept, sent = x.flatten()[idx], d.flatten()[idx]
            if name == "topk":
                assert torch.equal(sent, kept)
            else:
                assert bool(((sent - kept).abs() <= chunk_bound(kept, chunk)).all())


@pytest.mark.parametrize("name", CODECS)
def test_encoded_payload_survives_the_blob_envelope_bit_for_bit(name: str) -> None:
    grads = {"conv1.weight": torch.randn(4, 1, 3, 3), "fc.bias": torch.randn(10)}
    enc = encode(grads, CodecConfig(name, density=0.3, chunk=8))
    data = blobs.encode(enc.tensors, {"kind": "gradient", "codec": enc.meta}, compress=True)
    blob = blobs.decode(data, WHERE)
    direct = decode(enc.tensors, enc.meta, WHERE)
    via = decode(blob.tensors, blob.meta["codec"], WHERE, expected_shapes=shapes_of(grads))
    assert all(torch.equal(direct[k], via[k]) for k in grads)


def test_payload_size_shrinks_as_each_codec_promises() -> None:
    grads = {"w": torch.randn(256, 1024)}
    size = {n: encoded_nbytes(encode(grads, CodecConfig(n, density=0.01))) for n in LEGACY}
    n = 256 * 1024
    assert size["none"] == 4 * n
    assert size["fp16"] == size["bf16"] == 2 * n
    assert size["int8"] == n + 4 * (n // 4096)
    k = math.ceil(0.01 * n)
    assert size["topk"] == 8 * k
    assert size["topk+int8"] == 5 * k + 4 * -(-k // 4096)


def test_topk_keeps_at_least_one_element_of_every_tensor() -> None:
    enc = encode({"tiny": torch.tensor([0.5, -3.0, 1.0])}, CodecConfig("topk", density=0.01))
    assert enc.meta["tensors"]["tiny"]["k"] == 1
    assert enc.tensors["tiny.indices"].tolist() == [1]
    assert enc.tensors["tiny.values"].tolist() == [-3.0]


def test_indices_are_int32_below_two_to_the_31_elements_and_int64_above() -> None:
    assert codecs.index_dtype(2**31 - 1) == torch.int32
    assert codecs.index_dtype(2**31) == torch.int64


def test_all_zero_and_empty_tensors_survive_int8_and_topk() -> None:
    grads = {"zero": torch.zeros(5, 3), "empty": torch.zeros(0, 4)}
    for name in ("int8", "topk", "topk+int8"):
        enc = encode(grads, CodecConfig(name, chunk=4))
        out = decode(enc.tensors, enc.meta, WHERE, expected_shapes=shapes_of(grads))
        assert torch.equal(out["zero"], grads["zero"]) and out["empty"].shape == (0, 4)


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", ["topk", "topk+int8"])
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 12), density=st.floats(0.01, 0.5))
def test_error_feedback_delivers_every_input_eventually(name: str, seed: int, steps: int, density: float) -> None:
    """Σ_t sent_t + final residual == Σ_t g_t: nothing is lost, only delayed."""
    gen = torch.Generator().manual_seed(seed)
    cfg = CodecConfig(name, density=density, chunk=16)
    shapes = {"a": (7, 9), "b": (33,)}
    total_in = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    total_sent = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    residual = None
    for _ in range(steps):
        g = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
        enc = encode(g, cfg, residual)
        residual = enc.residual
        sent = decode(enc.tensors, enc.meta, WHERE, expected_shapes=shapes)
        for k in shapes:
            total_in[k] += g[k].double()
            total_sent[k] += sent[k].double()
    assert residual is not None
    for k in shapes:
        assert torch.allclose(total_sent[k] + residual[k].double(), total_in[k], atol=1e-4 * steps)


@pytest.mark.parametrize("name", ["topk", "topk+int8"])
def test_the_residual_is_sent_once_it_outgrows_the_new_gradient(name: str) -> None:
    cfg = CodecConfig(name, density=0.5)  # k = 1 of 2 elements
    first = encode({"w": torch.tensor([10.0, 3.0])}, cfg)
    assert first.residual is not None and first.residual["w"][1] == pytest.approx(3.0)
    second = encode({"w": torch.tensor([1.0, 0.5])}, cfg, first.residual)
    # 1.0 + ~0 vs 0.5 + 3.0: the carried 3.0 wins, and 3.5 is sent.
    sent = decode(second.tensors, second.meta, WHERE)["w"]
    assert sent[0] == 0 and sent[1] == pytest.approx(3.5, rel=1e-2)
    fresh = encode({"w": torch.tensor([1.0, 0.5])}, cfg)  # no residual: the larger new element is sent
    assert decode(fresh.tensors, fresh.meta, WHERE)["w"][1] == 0


def test_topk_int8_feeds_the_quantisation_error_back() -> None:
    x = torch.tensor([1.0, 0.3337, -0.77, 0.0001])
    enc = encode({"w": x}, CodecConfig("topk+int8", density=0.75, chunk=4))
    sent = decode(enc.tensors, enc.meta, WHERE)["w"]
    assert enc.residual is not None
    assert torch.allclose(enc.residual["w"], x - sent, atol=0, rtol=0)
    assert float(enc.residual["w"][1].abs()) > 0  # 0.3337 is not on the int8 grid of absmax 1.0


@pytest.mark.parametrize("name", ["none", "fp16", "bf16", "int8"])
def test_codecs_without_error_feedback_return_no_residual(name: str) -> None:
    assert encode({"w": torch.randn(3)}, CodecConfig(name), residual={"w": torch.ones(3)}).residual is None


def test_a_residual_for_other_tensors_is_refused() -> None:
    with pytest.raises(CodecError, match="residual"):
        encode({"w": torch.randn(3)}, CodecConfig("topk"), residual={"v": torch.ones(3)})
    with pytest.raises(CodecError, match="shape"):
        encode({"w": torch.randn(3)}, CodecConfig("topk"), residual={"w": torch.ones(4)})


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("kwargs", [{"name": "zz"}, {"density": 0.0}, {"density": 1.5}, {"chunk": 0}])
def test_invalid_codec_configs_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(CodecError):
        CodecConfig(**kwargs)


def test_encode_refuses_nan_gradients_and_fp16_overflow() -> None:
    with pytest.raises(CodecError, match="NaN"):
        encode({"w": torch.tensor([1.0, float("nan")])}, CodecConfig("topk"))
    with pytest.raises(CodecError, match="fp16 range"):
        encode({"w": torch.tensor([1e6])}, CodecConfig("fp16"))
    with pytest.raises(CodecError, match="floating"):
        encode({"w": torch.tensor([1, 2])}, CodecConfig("none"))


def test_unknown_codec_error_names_the_blob_and_the_known_codecs() -> None:
    enc = encode({"w": torch.randn(3)}, CodecConfig("none"))
    with pytest.raises(CodecError) as e:
        decode(enc.tensors, {**enc.meta, "codec": "zz"}, WHERE)
    assert str(e.value).startswith(f"unknown codec 'zz' in blob {WHERE} (known: none, fp16")


Mutation = Callable[[dict[str, torch.Tensor], dict[str, Any]], None]


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    d[key] = value


CORRUPTIONS: dict[str, tuple[str, Mutation]] = {
    "no codec header": ("none", lambda t, m: m.clear()),
    "unknown format": ("none", lambda t, m: _set(m, "format", 99)),
    "truncated index tensor": ("topk", lambda t, m: _set(t, "w.indices", t["w.indices"][:-1])),
    "index past the end": ("topk", lambda t, m: t["w.indices"].__setitem__(-1, 12 * 5)),
    "negative index": ("topk", lambda t, m: t["w.indices"].__setitem__(0, -1)),
    "duplicated index": ("topk", lambda t, m: t["w.indices"].__setitem__(1, int(t["w.indices"][0]))),
    "float indices": ("topk", lambda t, m: _set(t, "w.indices", t["w.indices"].float())),
    "too few scales": ("int8", lambda t, m: _set(t, "w.scales", t["w.scales"][:-1])),
    "too many scales": ("topk+int8", lambda t, m: _set(t, "w.scales", torch.cat([t["w.scales"], t["w.scales"]]))),
    "infinite scale": ("int8", lambda t, m: t["w.scales"].__setitem__(0, float("inf"))),
    "negative scale": ("int8", lambda t, m: t["w.scales"].__setitem__(0, -1.0)),
    "NaN value": ("none", lambda t, m: t["w.values"].__setitem__(3, float("nan"))),
    "NaN sparse value": ("topk", lambda t, m: t["w.values"].__setitem__(0, float("nan"))),
    "inf after fp16": ("fp16", lambda t, m: t["w.values"].__setitem__(0, float("inf"))),
    "values of the wrong dtype": ("int8", lambda t, m: _set(t, "w.values", t["w.values"].float())),
    "header shape disagrees with payload": ("none", lambda t, m: _set(m["tensors"]["w"], "shape", [12, 4])),
    "header k disagrees with payload": ("topk", lambda t, m: _set(m["tensors"]["w"], "k", 3)),
    "k larger than the tensor": ("topk", lambda t, m: _set(m["tensors"]["w"], "k", 61)),
    "k that is a bool": ("topk", lambda t, m: _set(m["tensors"]["w"], "k", True)),
    "negative dimension": ("none", lambda t, m: _set(m["tensors"]["w"], "shape", [-12, -5])),
    "missing payload tensor": ("topk+int8", lambda t, m: t.pop("w.scales")),
    "extra payload tensor": ("none", lambda t, m: _set(t, "w.extra", torch.zeros(1))),
    "payload values as a 2-D tensor": ("none", lambda t, m: _set(t, "w.values", t["w.values"].view(12, 5))),
    "missing chunk": ("int8", lambda t, m: m.pop("chunk")),
    "tensors header not an object": ("none", lambda t, m: _set(m, "tensors", [])),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_encodings_are_refused_with_the_blob_named(case: str) -> None:
    name, mutate = CORRUPTIONS[case]
    enc = encode({"w": torch.randn(12, 5)}, CodecConfig(name, density=0.2, chunk=16))
    tensors = {k: v.clone() for k, v in enc.tensors.items()}
    meta = {**enc.meta, "tensors": {k: dict(v) for k, v in enc.meta["tensors"].items()}}
    mutate(tensors, meta)
    with pytest.raises(CodecError, match=WHERE):
        decode(tensors, meta, WHERE)


@pytest.mark.parametrize("shapes", [{"w": (12, 6)}, {"w": (60,)}, {"v": (12, 5)}, {"w": (12, 5), "b": (5,)}])
def test_a_blob_that_does_not_fit_the_model_is_refused(shapes: dict[str, tuple[int, ...]]) -> None:
    enc = encode({"w": torch.randn(12, 5)}, CodecConfig("topk", density=0.2))
    with pytest.raises(CodecError, match="model"):
        decode(enc.tensors, enc.meta, WHERE, expected_shapes=shapes)


@HYP
@given(indices=st.lists(st.integers(-(2**31), 2**31 - 1), min_size=4, max_size=4))
def test_arbitrary_indices_either_decode_to_a_valid_gradient_or_are_refused(indices: list[int]) -> None:
    enc = encode({"w": torch.randn(6, 3)}, CodecConfig("topk", density=0.2))  # k = 4
    tensors = {**enc.tensors, "w.indices": torch.tensor(indices, dtype=torch.int32)}
    try:
        out = decode(tensors, enc.meta, WHERE)
    except CodecError:
        assert not (all(0 <= i < 18 for i in indices) and indices == sorted(set(indices)))
        return
    assert indices == sorted(set(indices)) and all(0 <= i < 18 for i in indices)
    assert int((out["w"] != 0).sum()) <= 4


# ---------------------------------------------------------------- DGC: momentum correction, masking, warm-up


def test_momentum_correction_accumulates_velocity_and_masks_it_where_values_were_sent() -> None:
    cfg = CodecConfig("topk", density=0.5, momentum=0.9)
    g1 = {"w": torch.tensor([4.0, 1.0, -0.5, 0.1])}
    first = encode(g1, cfg)  # u = g; v = u; sends 4.0 and 1.0
    assert first.velocity is not None and first.residual is not None
    assert torch.equal(first.velocity["w"], torch.tensor([0.0, 0.0, -0.5, 0.1]))  # masked where sent
    assert torch.equal(first.residual["w"], torch.tensor([0.0, 0.0, -0.5, 0.1]))
    g2 = {"w": torch.tensor([0.2, 0.0, -1.0, 0.0])}
    second = encode(g2, cfg, first.residual, first.velocity)
    u = 0.9 * torch.tensor([0.0, 0.0, -0.5, 0.1]) + g2["w"]
    v = torch.tensor([0.0, 0.0, -0.5, 0.1]) + u  # [0.2, 0, -1.95, 0.19]
    sent = decode(second.tensors, second.meta)["w"]
    assert torch.allclose(sent, torch.tensor([0.2, 0.0, float(v[2]), 0.0]))
    assert torch.allclose(second.residual["w"], v - sent)
    assert torch.allclose(second.velocity["w"], torch.tensor([0.0, 0.0, 0.0, float(u[3])]))


def test_without_momentum_correction_no_velocity_is_kept() -> None:
    assert encode({"w": torch.randn(8)}, CodecConfig("topk")).velocity is None


def test_momentum_correction_needs_a_topk_codec_and_a_momentum_below_one() -> None:
    with pytest.raises(CodecError, match="topk"):
        CodecConfig("int8", momentum=0.9)
    with pytest.raises(CodecError, match=r"\[0, 1\)"):
        CodecConfig("topk", momentum=1.0)
    with pytest.raises(CodecError, match="velocity"):
        encode({"w": torch.randn(3)}, CodecConfig("topk", momentum=0.9), velocity={"w": torch.ones(4)})


def test_density_warms_up_exponentially_from_a_quarter_to_the_target() -> None:
    from pipeline.codecs import warmup_density

    assert warmup_density(0.01, 0, 100) == pytest.approx(0.25)
    assert warmup_density(0.01, 50, 100) == pytest.approx(0.05)  # geometric mean of 0.25 and 0.01
    assert warmup_density(0.01, 100, 100) == 0.01
    assert warmup_density(0.01, 10**6, 100) == 0.01
    assert warmup_density(0.01, 5, 0) == 0.01
    assert warmup_density(0.5, 0, 100) == 0.5  # a target above the start needs no warm-up


def test_indices_use_the_narrowest_integer_that_holds_them() -> None:
    for numel, dtype in ((2**15, torch.int16), (2**15 + 1, torch.int32)):
        enc = encode({"w": torch.randn(numel)}, CodecConfig("topk", density=0.001))
        assert enc.tensors["w.indices"].dtype == dtype
        assert decode(enc.tensors, enc.meta)["w"].shape == (numel,)


@pytest.mark.parametrize("name", ["topk", "topk+int8", "topk+q4"])
def test_small_tensors_are_sent_whole_under_dense_below_and_the_large_ones_top_k(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    # The bias's magnitudes in [0.5, 1.5): int8 (absmax/127 steps) keeps every one non-zero. A randn bias held a
    # value below half a step in ~1 draw in 3, which int8 rightly rounds to 0: the test failed by test order.
    bias = torch.randn(64, generator=gen).sign() * (0.5 + torch.rand(64, generator=gen))
    g = {"bias": bias, "weight": torch.randn(64, 64, generator=gen)}
    cfg = codecs.CodecConfig(name, density=0.01, dense_below=64)
    enc = codecs.encode(g, cfg, {k: torch.zeros_like(t) for k, t in g.items()})
    out = codecs.decode(enc.tensors, enc.meta, "blob")
    assert bool((out["bias"] != 0).all())  # every element of the bias arrives ...
    assert int((out["weight"] != 0).sum()) == codecs.topk_count(64 * 64, 0.01)  # ... the weight's top 1% only
    if name == "topk":  # fp32 values: the bias arrives exactly, and nothing of it is left behind
        assert torch.equal(out["bias"], g["bias"]) and not bool(enc.residual["bias"].any())
    else:  # quantised: only the rounding error stays behind, fed back next step
        assert torch.allclose(out["bias"] + enc.residual["bias"], g["bias"], atol=1e-6)
    plain = codecs.encode(g, codecs.CodecConfig(name, density=0.01), {k: torch.zeros_like(t) for k, t in g.items()})
    assert int((codecs.decode(plain.tensors, plain.meta, "blob")["bias"] != 0).sum()) == 1


def test_dense_below_is_for_top_k_jobs_and_never_negative() -> None:
    from pipeline.spec import SpecError, parse_spec

    with pytest.raises(codecs.CodecError, match="dense_below"):
        codecs.CodecConfig("topk", dense_below=-1)
    with pytest.raises(SpecError, match="codec_dense_below: sends small tensors whole under a top-k codec"):
        parse_spec({"codec": "int8", "codec_dense_below": 1024})
    assert parse_spec({"codec": "topk+q4", "codec_dense_below": 1024}).codec_dense_below == 1024


def test_local_clipping_scales_the_gradient_to_the_norm_before_it_is_accumulated() -> None:
    g = {"a": torch.full((30,), 3.0), "b": torch.full((10,), -4.0)}  # joint L2 norm sqrt(270 + 160)
    norm = math.sqrt(430.0)
    cfg = codecs.CodecConfig("topk", density=1.0, clip_norm=2.0)
    enc = codecs.encode(g, cfg, {k: torch.zeros_like(t) for k, t in g.items()})
    out = codecs.decode(enc.tensors, enc.meta, "blob")
    sent = math.sqrt(sum(float(t.square().sum()) for t in out.values()))
    assert sent == pytest.approx(2.0, rel=1e-5)
    assert torch.allclose(out["a"], g["a"] * (2.0 / norm)) and torch.allclose(out["b"], g["b"] * (2.0 / norm))
    # What is held back (the residual) and the velocity are of the clipped gradient too.
    half = codecs.encode(g, codecs.CodecConfig("topk", density=0.5, clip_norm=2.0, momentum=0.9),
                         {k: torch.zeros_like(t) for k, t in g.items()})
    total = {k: codecs.decode(half.tensors, half.meta, "blob")[k] + half.residual[k] for k in g}
    assert all(torch.allclose(total[k], g[k] * (2.0 / norm)) for k in g)
    # Below the norm nothing changes; the norm is a top-k codec's knob, never negative or NaN.
    small = codecs.encode(g, codecs.CodecConfig("topk", density=1.0, clip_norm=100.0))
    assert torch.equal(codecs.decode(small.tensors, small.meta, "blob")["a"], g["a"])
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(codecs.CodecError, match="clip_norm"):
            codecs.CodecConfig("topk", clip_norm=bad)
    with pytest.raises(codecs.CodecError, match="clip_norm .* needs a topk codec"):
        codecs.CodecConfig("int8", clip_norm=1.0)


def test_clip_norm_is_a_setting_of_top_k_jobs_only() -> None:
    from pipeline.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="codec_clip_norm: local gradient clipping comes with a top-k codec"):
        parse_spec({"codec": "none", "codec_clip_norm": 1.0})
    assert parse_spec({"codec": "topk+q4", "codec_clip_norm": 1.0}).codec_clip_norm == 1.0
