"""Serving artifacts: the packing chain, its size, what the loaded model serves, and refusal of bad artifacts."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch.nn import functional as F

from pipeline import blobs
from pipeline.artifacts import ArtifactChain, ChainError, build_artifact, dequantized_state, load_artifact
from pipeline.blobs import BlobError
from pipeline.models import build_model, default_args

M = "digits-cnn"
WHERE = "models/digits-cnn/v000007.aast"


def weights(seed: int = 0, **args: Any) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model(M, args).state_dict()


def pack(chain: str | ArtifactChain, seed: int = 0, **kw: Any) -> tuple[bytes, dict[str, Any]]:
    c = ArtifactChain.parse(chain) if isinstance(chain, str) else chain
    return build_artifact(M, default_args(M), weights(seed), chain=c, **kw)


def reference_logits(w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """digits-cnn's forward pass written out with functional ops: x (B, 1, 8, 8) → (B, 10)."""
    h = F.relu(F.conv2d(x, w["conv1.weight"], w["conv1.bias"], padding=1))  # (B, 16, 8, 8)
    h = F.max_pool2d(F.relu(F.conv2d(h, w["conv2.weight"], w["conv2.bias"], padding=1)), 2)  # (B, 32, 4, 4)
    h = F.relu(F.linear(h.flatten(1), w["fc1.weight"], w["fc1.bias"]))  # (B, 64)
    return F.linear(h, w["fc2.weight"], w["fc2.bias"])


# ---------------------------------------------------------------- the chain string


@pytest.mark.parametrize("text,chain", [
    ("zstd", ArtifactChain()),
    ("none", ArtifactChain(zstd=False)),
    ("fp32", ArtifactChain(zstd=False)),
    ("fp16", ArtifactChain(quantize="fp16", zstd=False)),
    ("prune:0.5,int8,zstd", ArtifactChain(prune_sparsity=0.5, quantize="int8")),
    (" Threshold:0.01 , FP16 , dense ", ArtifactChain(prune_threshold=0.01, quantize="fp16", sparse=False, zstd=False)),
    ("fp32+zstd", ArtifactChain()),
    ("prune:0.5,int4,zstd", ArtifactChain(prune_sparsity=0.5, quantize="int4")),
    ("int4:128", ArtifactChain(quantize="int4", group=128, zstd=False)),
])
def test_chain_strings_parse_to_the_chain_they_name(text: str, chain: ArtifactChain) -> None:
    assert ArtifactChain.parse(text) == chain
    assert ArtifactChain.parse(chain.describe()) == chain


@pytest.mark.parametrize("text,match", [
    ("gzip", "unknown step 'gzip'"),
    ("prune", "unknown step 'prune'"),
    ("zstd:19", "unknown step 'zstd:19'"),
    ("prune:half", "not a number"),
    ("prune:1.5", r"\[0, 1\)"),
    ("threshold:-1", "≥ 0"),
    ("fp16,int8", "quantize twice"),
    ("prune:0.5,threshold:0.1", "prune twice"),
    ("int8,,zstd", "unknown step ''"),
    ("int8:64", "unknown step 'int8:64'"),
    ("int4:x", "not an integer"),
    ("int4:4", r"\[8, 4096\]"),
    ("int4:8192", r"\[8, 4096\]"),
])
def test_bad_chain_strings_are_refused_with_the_reason(text: str, match: str) -> None:
    with pytest.raises(ChainError, match=match):
        ArtifactChain.parse(text)


def test_threshold_and_sparsity_pruning_are_mutually_exclusive() -> None:
    with pytest.raises(ChainError, match="mutually exclusive"):
        ArtifactChain(prune_threshold=0.1, prune_sparsity=0.5)


# ---------------------------------------------------------------- size


def test_raw_bytes_is_the_fp32_safetensors_size_of_the_state_dict() -> None:
    _, stats = pack("zstd")
    assert stats["raw_bytes"] == len(st_save(weights(0)))
    assert stats["ratio"] == pytest.approx(stats["raw_bytes"] / stats["stored_bytes"])


def test_int8_with_half_the_weights_pruned_and_zstd_is_over_six_times_smaller() -> None:
    # Not 8×: half the weights are kept as int8 codes spread over ~128 values (≈7 bits of entropy each)
    # and which half is kept costs ≈1 bit per weight, so no lossless coder stores this chain in fewer than
    # ≈4.5 bits per weight, a ratio of at most ≈7.1× against fp32. We reach ≈6.2× (zstd + headers).
    data, stats = pack("prune:0.5,int8,zstd")
    assert stats["ratio"] >= 6.0
    assert stats["stored_bytes"] == len(data)
    assert stats["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_int8_with_70_percent_pruning_and_zstd_is_at_least_eight_times_smaller() -> None:
    _, stats = pack("prune:0.7,int8,zstd")
    assert stats["ratio"] >= 8.0


def test_int4_with_half_the_weights_pruned_and_zstd_is_over_eight_times_smaller() -> None:
    # ≈1 bit of mask + 4 bits per kept code + 16/64 bits of fp16 scale per weight ≈ 3.25 bits: ≈9.8× at best.
    data, stats = pack("prune:0.5,int4,zstd")
    assert stats["ratio"] >= 8.0
    assert stats["stored_bytes"] == len(data)


def test_int4_codes_are_stored_two_per_byte() -> None:
    data, _ = pack("int4,dense")
    blob = blobs.decode(data)
    w = weights(0)["fc1.weight"]
    assert blob.tensors["fc1.weight.values"].dtype == torch.uint8
    assert blob.tensors["fc1.weight.values"].numel() == w.numel() // 2
    assert blob.tensors["fc1.weight.scales"].dtype == torch.float16
    assert blob.tensors["fc1.weight.scales"].numel() == w.numel() // 64


def test_sparse_storage_makes_pruned_zeros_nearly_free_without_zstd() -> None:
    _, dense = pack("prune:0.9,int8,dense")
    _, sparse = pack("prune:0.9,int8,sparse")
    assert sparse["stored_bytes"] < 0.45 * dense["stored_bytes"]


def test_every_sparse_layout_is_chosen_where_it_is_smallest() -> None:
    layouts = set()
    for chain in ("zstd", "prune:0.5,int8", "prune:0.98,int8"):  # dense; bitmask; coo (below 1/32 density)
        data, _ = pack(chain)
        layouts |= {e["layout"] for e in blobs.decode(data).meta["tensors"].values()}
    assert layouts == {"dense", "bitmask", "coo"}


# ---------------------------------------------------------------- what is served


CHAINS = ["zstd", "none", "fp16", "int8,zstd", "prune:0.5,int8,zstd", "prune:0.5,int8,dense",
          "threshold:0.03,fp16", "prune:0.98,int8,sparse", "threshold:0.02", "int4,zstd", "prune:0.5,int4,zstd",
          "int4:32,dense", "prune:0.98,int4:128"]


@pytest.mark.parametrize("chain", CHAINS)
def test_the_loaded_model_computes_what_its_dequantised_weights_compute(chain: str) -> None:
    data, _ = pack(chain, signing_key=b"k")
    loaded = load_artifact(data, WHERE, signing_key=b"k")
    deq = dequantized_state(data, WHERE, signing_key=b"k")
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert not loaded.model.training
    assert loaded.meta["chain"] == ArtifactChain.parse(chain).describe()
    assert all(t.dtype == torch.float32 for t in deq.values())
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), reference_logits(deq, x), atol=1e-5, rtol=0)


def test_the_default_chain_serves_the_training_weights_exactly() -> None:
    data, _ = pack(ArtifactChain())
    deq = dequantized_state(data, WHERE)
    assert all(torch.equal(deq[k], v) for k, v in weights(0).items())


def test_sparsity_pruning_zeroes_that_fraction_of_each_weight_and_no_bias() -> None:
    deq = dequantized_state(pack("prune:0.3")[0], WHERE)
    for name, w in weights(0).items():
        zeros = int((deq[name] == 0).sum())
        if w.dim() >= 2:
            assert zeros == round(0.3 * w.numel())
            kept = deq[name] != 0
            assert torch.equal(deq[name][kept], w[kept])
            assert float(w[~kept].abs().max()) <= float(w[kept].abs().min())
        else:
            assert torch.equal(deq[name], w)


def test_threshold_pruning_serves_w_times_the_indicator_of_abs_w_above_tau() -> None:
    deq = dequantized_state(pack("threshold:0.04")[0], WHERE)
    for name, w in weights(0).items():
        expect = w * (w.abs() > 0.04) if w.dim() >= 2 else w
        assert torch.equal(deq[name], expect)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 1000), quantize=st.sampled_from(["none", "fp16", "int8", "int4"]),
       sparsity=st.one_of(st.none(), st.floats(0.0, 0.95)), sparse=st.booleans(), zstd=st.booleans())
def test_served_weights_stay_within_each_quantisations_error_of_the_pruned_weights(
    seed: int, quantize: str, sparsity: float | None, sparse: bool, zstd: bool
) -> None:
    chain = ArtifactChain(prune_sparsity=sparsity, quantize=quantize, sparse=sparse, zstd=zstd)  # type: ignore[arg-type]
    deq = dequantized_state(pack(chain, seed)[0], WHERE)
    for name, w in weights(seed).items():
        if w.dim() < 2:
            assert torch.equal(deq[name], w)  # biases stay fp32
            continue
        err = (deq[name] - w).abs()
        kept = deq[name] != 0
        if quantize == "none":
            assert torch.equal(deq[name][kept], w[kept])
        elif quantize == "fp16":
            assert bool((err[kept] <= w[kept].abs() * 2**-11 + 2**-25).all())
        elif quantize == "int4":  # half a step of the group's fp16 scale absmax/7, plus the scale's rounding × 7
            flat = w.flatten()
            absmax = F.pad(flat, (0, -flat.numel() % 64)).view(-1, 64).abs().amax(dim=1)  # (groups,)
            bound = (absmax / 14 + absmax * 2**-10 + 2**-24).repeat_interleave(64)[: flat.numel()]
            assert bool((err.flatten()[kept.flatten()] <= bound[kept.flatten()]).all())
        else:  # int8: half a step of the output channel's scale absmax/127, plus a few fp32 ulps of absmax
            absmax = w.flatten(1).abs().amax(dim=1)  # (C,)
            bound = absmax / 254 + absmax * 2**-20
            assert bool((err[kept].flatten() <= bound.repeat_interleave(w[0].numel())[kept.flatten()]).all())


# ---------------------------------------------------------------- refusals


def repack(data: bytes, mutate: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> bytes:
    """A well-formed envelope (valid sha256) around malformed content: what a buggy or hostile writer makes."""
    blob = blobs.decode(data)
    tensors = {k: v.clone() for k, v in blob.tensors.items()}
    meta = {**blob.meta, "tensors": {k: dict(v) for k, v in blob.meta["tensors"].items()}}
    mutate(tensors, meta)
    return blobs.encode(tensors, meta, compress=True)


def _set(d: dict[str, Any], key: str, value: Any) -> None:
    d[key] = value


def set_lowest_clear_bit(mask: torch.Tensor) -> None:
    """Mark one more element as nonzero in a packed bitmask (uint8), in place."""
    j = int((mask != 0xFF).nonzero()[0])
    b = int(mask[j])
    mask[j] = b | (~b & (b + 1))


CORRUPTIONS: dict[str, tuple[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], None]]] = {
    "not an artifact": ("zstd", lambda t, m: _set(m, "kind", "gradient")),
    "unknown packing": ("zstd", lambda t, m: _set(m, "packing", "int4-magic")),
    "unknown layout": ("zstd", lambda t, m: _set(m["tensors"]["fc1.weight"], "layout", "csr")),
    "unknown model": ("zstd", lambda t, m: _set(m, "model", "resnet-9000")),
    "model args that change the shapes": ("zstd", lambda t, m: _set(m, "model_args", {"hidden": 65})),
    "model args the factory rejects": ("zstd", lambda t, m: _set(m, "model_args", {"depth": 3})),
    "header shape not the model's": ("zstd", lambda t, m: _set(m["tensors"]["fc2.weight"], "shape", [5, 128])),
    "header missing a tensor": ("zstd", lambda t, m: m["tensors"].pop("fc2.bias")),
    "payload with an extra tensor": ("zstd", lambda t, m: _set(t, "fc2.bias.spare", torch.zeros(3))),
    "payload missing a tensor": ("int8", lambda t, m: t.pop("conv1.weight.scales")),
    "NaN in a bias": ("zstd", lambda t, m: t["fc2.bias.values"].__setitem__(0, float("nan"))),
    "Inf in an fp16 weight": ("fp16", lambda t, m: t["fc2.weight.values"].__setitem__(0, float("inf"))),
    "infinite channel scale": ("int8", lambda t, m: t["fc1.weight.scales"].__setitem__(3, float("inf"))),
    "negative channel scale": ("int8", lambda t, m: t["fc1.weight.scales"].__setitem__(3, -0.1)),
    "one scale too few": ("int8", lambda t, m: _set(t, "fc1.weight.scales", t["fc1.weight.scales"][:-1])),
    "int8 values stored as float": ("int8", lambda t, m: _set(t, "fc1.weight.values", t["fc1.weight.values"].float())),
    "an int8 bias": ("zstd", lambda t, m: (_set(m["tensors"]["fc2.bias"], "dtype", "int8"),
                                          _set(t, "fc2.bias.values", t["fc2.bias.values"].to(torch.int8)))),
    "truncated values": ("zstd", lambda t, m: _set(t, "fc1.weight.values", t["fc1.weight.values"][:-1])),
    "coo index past the end": ("prune:0.98,int8", lambda t, m: t["fc1.weight.indices"].__setitem__(-1, 64 * 512)),
    "negative coo index": ("prune:0.98,int8", lambda t, m: t["fc1.weight.indices"].__setitem__(0, -5)),
    "duplicated coo index": ("prune:0.98,int8", lambda t, m: t["fc1.weight.indices"].__setitem__(
        1, int(t["fc1.weight.indices"][0]))),
    "truncated coo indices": ("prune:0.98,int8", lambda t, m: _set(
        t, "fc1.weight.indices", t["fc1.weight.indices"][:-1])),
    "nnz beyond the tensor": ("prune:0.5,int8", lambda t, m: _set(m["tensors"]["fc2.weight"], "nnz", 10**9)),
    "bitmask with a bit too many": ("prune:0.5,int8", lambda t, m: set_lowest_clear_bit(t["conv1.weight.mask"])),
    "int4 code -8": ("int4", lambda t, m: t["fc1.weight.values"].__setitem__(0, 0x88)),
    "int4 values stored unpacked": ("int4", lambda t, m: _set(t, "fc1.weight.values",
                                                             t["fc1.weight.values"].repeat_interleave(2))),
    "int4 group scale infinite": ("int4", lambda t, m: t["fc1.weight.scales"].__setitem__(2, float("inf"))),
    "int4 group scale negative": ("int4", lambda t, m: t["fc1.weight.scales"].__setitem__(2, -1.0)),
    "int4 scales as fp32": ("int4", lambda t, m: _set(t, "fc1.weight.scales", t["fc1.weight.scales"].float())),
    "int4 group that does not match the scales": ("int4", lambda t, m: _set(m["tensors"]["fc1.weight"], "group", 32)),
    "int4 group missing": ("int4", lambda t, m: m["tensors"]["fc1.weight"].pop("group")),
    "int4 bias": ("int4", lambda t, m: _set(m["tensors"]["fc2.bias"], "dtype", "int4")),
    "int4 bitmask with a bit too many": ("prune:0.5,int4", lambda t, m: set_lowest_clear_bit(t["conv1.weight.mask"])),
    "bitmask padding bits set": ("prune:0.5,int8", lambda t, m: t["conv1.weight.mask"].__setitem__(
        -1, int(t["conv1.weight.mask"][-1]) | 0x80)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_malformed_artifacts_are_refused_with_the_artifact_named(case: str) -> None:
    chain, mutate = CORRUPTIONS[case]
    bad = repack(pack(chain)[0], mutate)
    with pytest.raises(BlobError, match=WHERE):
        load_artifact(bad, WHERE)
    with pytest.raises(BlobError, match=WHERE):
        dequantized_state(bad, WHERE)


def test_truncated_flipped_or_wrongly_signed_bytes_are_refused() -> None:
    data, _ = pack("prune:0.5,int8,zstd", signing_key=b"right")
    flipped = bytearray(data)
    flipped[-10] ^= 1
    for bad, key in ((data[: len(data) // 2], b"right"), (bytes(flipped), b"right"), (data, b"wrong")):
        with pytest.raises(BlobError, match=WHERE):
            load_artifact(bad, WHERE, signing_key=key)


def test_artifacts_written_before_the_chain_existed_still_load() -> None:
    w = weights(3)
    meta = {"kind": "artifact", "model": M, "model_args": default_args(M), "packing": "fp32"}
    loaded = load_artifact(blobs.encode(w, meta, compress=True), WHERE)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in w.items())
    broken = blobs.encode({**w, "fc2.bias": torch.full((10,), float("nan"))}, meta)
    with pytest.raises(BlobError, match=WHERE):
        load_artifact(broken, WHERE)


def test_loading_never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during artifact load")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    for chain in ("zstd", "prune:0.5,int8,zstd", "prune:0.98,fp16"):
        load_artifact(pack(chain)[0], WHERE)
