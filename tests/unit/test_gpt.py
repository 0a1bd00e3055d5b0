"""Big models on the workers: the gpt sizes, building without init, the per-process model cache,
gradient accumulation and mixed precision."""

from __future__ import annotations

import pytest
import torch

from pipeline import blobs
from pipeline.checkpoint import Checkpoint, initial_checkpoint
from pipeline.models import build_model, count_parameters, default_args, model_task
from pipeline.models.gpt import SIZES, config_for
from pipeline.spec import SpecError, parse_spec
from pipeline.training import autocast_dtype, gradient, local_steps
from storage import keys
from workers import shard

TINY = {"size": "1m", "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}


def batch(rows: int = 8, t: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (rows, t + 1), generator=g)  # (B, T+1) bytes
    return x[:, :-1], x[:, 1:]  # inputs and next-byte targets, (B, T) each


@pytest.mark.parametrize(("size", "low", "high"), [("1m", 0.8e6, 1.2e6), ("10m", 9e6, 12e6),
                                                  ("100m", 90e6, 120e6), ("1b", 1.0e9, 1.3e9)])
def test_each_named_size_has_its_parameter_count_without_allocating_it(size: str, low: float, high: float) -> None:
    with torch.device("meta"):  # 1b would be 4 GB of fp32 to build for real
        model = build_model("gpt", {"size": size})
    n = count_parameters(model)
    assert low <= n <= high
    assert n == SIZES[size].n_params()


def test_gpt_is_a_built_in_lm_whose_checkpoint_records_the_size_name() -> None:
    assert model_task("gpt") == "lm"
    assert default_args("gpt") == {"size": "1m"}
    ckpt = initial_checkpoint("gpt", {"size": "10m", "n_layer": 1}, seed=0)
    assert ckpt.model_args == {"size": "10m", "n_layer": 1}
    assert ckpt.build().cfg == config_for("10m", n_layer=1)  # type: ignore[attr-defined]


def test_an_unknown_size_or_argument_is_named() -> None:
    with pytest.raises(ValueError, match="unknown size '3b'"):
        build_model("gpt", {"size": "3b"})
    with pytest.raises(TypeError, match="n_layers"):
        build_model("gpt", {"n_layers": 3})


def test_the_chars_data_set_feeds_gpt() -> None:
    from pipeline.data import load_dataset

    ds = load_dataset("chars", {"block_size": 16, "max_chars": 4_000})
    model = build_model("gpt", TINY)
    assert model(ds.x_train[:2]).shape == (2, 16, 256)  # (B, T, V)


def test_building_from_a_checkpoint_initialises_nothing_and_gives_the_same_module() -> None:
    ckpt = initial_checkpoint("gpt", TINY, seed=3)
    rng = torch.get_rng_state()
    model = ckpt.build()
    assert torch.equal(rng, torch.get_rng_state())  # no random init ran: the weights came from the checkpoint
    assert all(p.requires_grad for p in model.parameters())
    for name, t in model.state_dict().items():
        assert torch.equal(t, ckpt.state[name]), name
        assert t.data_ptr() != ckpt.state[name].data_ptr(), name  # a copy by default: the caller may train it
    shared = ckpt.build(copy=False)
    assert all(t.data_ptr() == ckpt.state[n].data_ptr() for n, t in shared.state_dict().items())
    real = build_model("gpt", TINY)
    real.load_state_dict(ckpt.state)
    x, _ = batch()
    with torch.no_grad():
        assert torch.equal(model(x), real(x))


def test_a_module_with_a_non_persistent_buffer_is_built_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.settings import get_settings

    monkeypatch.setenv("AAS_ALLOWED_IMPORTS", "tests.unit.test_gpt")  # a user model: allowlisted explicitly
    get_settings.cache_clear()
    ckpt = Checkpoint("tests.unit.test_gpt:with_buffer", {}, 0, dict(with_buffer().state_dict()))
    try:
        model = ckpt.build()
    finally:
        monkeypatch.delenv("AAS_ALLOWED_IMPORTS")
        get_settings.cache_clear()
    assert torch.equal(model.scale, torch.full((3,), 2.0))  # type: ignore[arg-type]


class WithBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.register_buffer("scale", torch.full((3,), 2.0), persistent=False)  # not in the state dict


def with_buffer() -> torch.nn.Module:
    return WithBuffer()


def test_micro_batches_give_the_full_batch_gradient_within_fp32_rounding() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", TINY)
    x, y = batch(rows=10)
    full = gradient(model, x, y)
    for mb in (1, 3, 4):  # 3 and 4 leave a smaller last slice
        part = gradient(model, x, y, micro_batch_size=mb)
        assert part.samples == 10 and part.loss == pytest.approx(full.loss, rel=1e-6)
        for name, g in full.update.items():
            assert torch.allclose(part.update[name], g, rtol=1e-4, atol=1e-6), (mb, name)
    assert all(p.grad is None for p in model.parameters())  # nothing kept on the module


def test_local_steps_with_micro_batches_match_and_leave_the_weights_as_they_were() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", TINY)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [batch(rows=6, seed=s) for s in range(3)]
    # SGD: Adam's first steps are ≈ lr·sign(g), which turns fp32 rounding of a near-zero g into ±lr.
    a = local_steps(model, batches, optimizer="sgd", lr=0.1)
    b = local_steps(model, batches, optimizer="sgd", lr=0.1, micro_batch_size=4)
    local_steps(model, batches, optimizer="adamw", lr=1e-3)
    for name, d in a.update.items():
        assert d.abs().max() > 0, name
        assert torch.allclose(b.update[name], d, rtol=1e-3, atol=1e-7), name
        assert torch.equal(dict(model.named_parameters())[name].detach(), before[name]), name


def test_bf16_autocast_gradients_stay_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = build_model("gpt", TINY)
    x, y = batch(rows=8)
    ref = gradient(model, x, y, precision="fp32")
    low = gradient(model, x, y, precision="bf16")  # CPU autocast: the same code path CUDA takes
    assert all(g.dtype == torch.float32 for g in low.update.values())
    flat_ref = torch.cat([g.flatten() for g in ref.update.values()])
    flat_low = torch.cat([g.flatten() for g in low.update.values()])
    assert torch.nn.functional.cosine_similarity(flat_ref, flat_low, dim=0) > 0.99
    assert (flat_low - flat_ref).norm() / flat_ref.norm() < 0.1
    assert low.loss == pytest.approx(ref.loss, rel=0.02)


def test_auto_precision_is_bf16_on_cuda_and_fp32_elsewhere() -> None:
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", torch.device("cpu"))
    with pytest.raises(SpecError, match="micro_batch_size"):
        parse_spec({"micro_batch_size": 0})


def stage_gpt(unit_ctx, **spec) -> str:
    from pipeline.client import Client

    client = Client(unit_ctx.settings, store=unit_ctx.store, redis_client=unit_ctx.redis, dispatch=unit_ctx.dispatch)
    return client.stage({"model": "gpt", "model_args": TINY, "dataset": "chars",
                         "dataset_args": {"block_size": 16, "max_chars": 6_000}, "shards": 2, "batch_size": 4,
                         **spec})


@pytest.mark.parametrize("local", [1, 2])
def test_a_shard_worker_builds_each_version_once_and_a_cached_module_gives_the_same_update(unit_ctx, local) -> None:
    job_id = stage_gpt(unit_ctx, local_steps=local, inner_optimizer="adamw", micro_batch_size=3)
    key = keys.checkpoint(job_id, 0)
    first = shard.train_shard(unit_ctx, job_id, 0, 0, 0, 0)
    module = unit_ctx.models.get(f"{key}@cpu")
    assert module is not None
    again = shard.train_shard(unit_ctx, job_id, 0, 0, 0, 1)  # a redelivery: same version, same step
    assert unit_ctx.models.get(f"{key}@cpu") is module  # not rebuilt
    got = blobs.decode(unit_ctx.store.get(again["key"]), "again").tensors
    want = blobs.decode(unit_ctx.store.get(first["key"]), "first").tensors
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.grad is None for p in module.parameters())


def test_a_new_version_replaces_the_cached_module(unit_ctx) -> None:
    from workers import aggregator

    job_id = stage_gpt(unit_ctx)
    results = [shard.train_shard(unit_ctx, job_id, s, 0, 0, 0) for s in range(2)]
    assert aggregator.aggregate_round(unit_ctx, job_id, 0, results).committed
    shard.train_shard(unit_ctx, job_id, 0, 1, 1, 0)
    assert unit_ctx.models.get(f"{keys.checkpoint(job_id, 0)}@cpu") is None
    assert unit_ctx.models.get(f"{keys.checkpoint(job_id, 1)}@cpu") is not None


def test_a_cuda_device_the_process_cannot_see_is_refused_by_name(unit_ctx) -> None:
    from dataclasses import replace

    ctx = replace(unit_ctx, settings=unit_ctx.settings.model_copy(update={"device": "cuda:7"}))
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises(ValueError, match="AAS_DEVICE=cuda:7"):
        ctx.device()
    cpu = replace(unit_ctx, settings=unit_ctx.settings.model_copy(update={"device": "cpu"}))
    assert cpu.device() == torch.device("cpu")
