from __future__ import annotations

import pytest
import torch

from pipeline.aggregate import (
    Update,
    UpdateRejected,
    check_update,
    delay_compensated,
    select_round,
    sgd_step,
    staleness_lr,
    staleness_momentum,
    weighted_mean,
)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 1e-3)])
def test_sgd_step_matches_torch_optim_sgd_over_several_steps(momentum: float, nesterov: bool, wd: float) -> None:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.SGD([p], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    params = {"w": p.detach().clone()}
    bufs: dict[str, torch.Tensor] = {}
    for _ in range(4):
        g = torch.randn(5, 3)
        p.grad = g.clone()
        opt.step()
        params, bufs = sgd_step(params, {"w": g}, bufs, lr=0.1, momentum=momentum, nesterov=nesterov,
                                weight_decay=wd)
    assert torch.allclose(params["w"], p.detach(), atol=1e-6)


def test_weighted_mean_weights_each_update_by_its_samples() -> None:
    a = Update("a", 0, {"w": torch.tensor([1.0, 1.0])}, samples=1, loss=1.0)
    b = Update("b", 1, {"w": torch.tensor([4.0, 0.0])}, samples=3, loss=3.0)
    mean, n, loss = weighted_mean([a, b])
    assert n == 4
    assert torch.allclose(mean["w"], torch.tensor([3.25, 0.25]))
    assert loss == pytest.approx(2.5)


def test_weighted_mean_of_only_empty_updates_is_rejected() -> None:
    with pytest.raises(UpdateRejected, match="no samples"):
        weighted_mean([Update("a", 0, {"w": torch.zeros(1)}, samples=0, loss=0.0)])


def test_select_round_keeps_one_result_per_shard_and_reports_the_missing_one() -> None:
    # A redelivered header task made the chord fire with shard 1 twice and shard 2 absent.
    results = [{"shard": 0, "key": "k0"}, {"shard": 1, "key": "k1"}, {"shard": 1, "key": "k1-again"}]
    by_shard, missing = select_round(results, [0, 1, 2])
    assert sorted(by_shard) == [0, 1]
    assert by_shard[1]["key"] == "k1"
    assert missing == [2]


def test_check_update_rejects_nan_and_wrong_shapes_and_names() -> None:
    params = {"w": torch.zeros(2, 2)}
    check_update({"w": torch.ones(2, 2)}, params, "blob")
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        check_update({"w": torch.tensor([[1.0, float("nan")], [0, 0]])}, params, "blob")
    with pytest.raises(UpdateRejected, match="shape"):
        check_update({"w": torch.ones(3)}, params, "blob")
    with pytest.raises(UpdateRejected, match="names differ"):
        check_update({"v": torch.ones(2, 2)}, params, "blob")


def test_staleness_scales_the_learning_rate_and_refuses_future_updates() -> None:
    assert staleness_lr(0.1, 0, "inverse") == pytest.approx(0.1)
    assert staleness_lr(0.1, 3, "inverse") == pytest.approx(0.025)
    assert staleness_lr(0.1, 3, "constant") == pytest.approx(0.1)
    with pytest.raises(UpdateRejected, match="future"):
        staleness_lr(0.1, -1, "inverse")


def test_delay_compensation_adds_the_scaled_hessian_diagonal_times_the_weights_drift() -> None:
    g = {"w": torch.tensor([1.0, -2.0, 0.5])}
    base = {"w": torch.tensor([0.0, 0.0, 0.0])}
    now = {"w": torch.tensor([0.1, 0.2, -0.4])}
    ms: dict[str, torch.Tensor] = {}
    out = delay_compensated(g, now, base, ms, lam=2.0)
    # The first mean square is g⊙g itself: g + λ0·g⊙g/|g|⊙drift = g + 2·|g|⊙drift.
    assert torch.allclose(out["w"], torch.tensor([1.0 + 2 * 1.0 * 0.1, -2.0 + 2 * 2.0 * 0.2, 0.5 - 2 * 0.5 * 0.4]))
    assert torch.allclose(ms["w"], g["w"] ** 2)
    assert torch.equal(g["w"], torch.tensor([1.0, -2.0, 0.5]))  # the input (maybe cached) is left alone
    # A second gradient moves the mean square by 5%; with no drift (staleness 0) it passes unchanged.
    g2 = {"w": torch.tensor([3.0, 0.0, 0.5])}
    same = delay_compensated(g2, now, now, ms, lam=2.0)
    assert torch.equal(same["w"], g2["w"])
    assert torch.allclose(ms["w"], 0.95 * g["w"] ** 2 + 0.05 * g2["w"] ** 2)


def test_staleness_takes_asynchronys_implicit_momentum_off_the_explicit_one() -> None:
    assert staleness_momentum(0.9, []) == 0.9 and staleness_momentum(0.9, [0, 0]) == 0.9
    assert staleness_momentum(0.9, [0, 2]) == pytest.approx(0.9 - 1 / 2)  # s̄ = 1: implicit 1 − 1/2
    assert staleness_momentum(0.9, [3]) == pytest.approx(0.9 - 3 / 4)
    assert staleness_momentum(0.5, [9]) == 0.0  # never negative
    assert staleness_momentum(0.9, [1], fraction=0.5) == pytest.approx(0.9 - 0.25)
    assert staleness_momentum(0.9, [1], fraction=0.0) == 0.9


def _tiny_model_and_batches(steps: int) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    batches = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(steps)]
    return model, batches


def _apply(model: torch.nn.Module, delta: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.sub_(delta[n])


def test_a_kept_adamw_state_makes_two_rounds_of_h_steps_one_run_of_2h_and_a_reset_does_not() -> None:
    from pipeline.training import local_steps

    model, batches = _tiny_model_and_batches(6)
    whole = local_steps(model, batches, optimizer="adamw", lr=1e-2)
    first = local_steps(model, batches[:3], optimizer="adamw", lr=1e-2, keep_state=True)
    assert first.inner_state is not None and {k.rsplit(".", 1)[1] for k in first.inner_state} == {
        "exp_avg", "exp_avg_sq", "step"}
    assert float(first.inner_state["0.weight.step"]) == 3.0
    _apply(model, first.update)  # one shard, outer lr 1: the next round starts where this one ended
    kept = local_steps(model, batches[3:], optimizer="adamw", lr=1e-2, state=first.inner_state, keep_state=True)
    reset = local_steps(model, batches[3:], optimizer="adamw", lr=1e-2)
    assert float(kept.inner_state["0.weight.step"]) == 6.0
    for n in whole.update:
        two = first.update[n] + kept.update[n]
        assert torch.allclose(two, whole.update[n], atol=1e-6), n
        assert not torch.allclose(first.update[n] + reset.update[n], whole.update[n], atol=1e-4), n
    assert local_steps(model, batches[:3], optimizer="sgd", lr=0.1, keep_state=True).inner_state is None


def test_a_kept_sgd_momentum_buffer_makes_two_rounds_of_h_steps_one_run_of_2h_and_a_reset_does_not() -> None:
    from pipeline.training import local_steps

    model, batches = _tiny_model_and_batches(6)
    whole = local_steps(model, batches, optimizer="sgd", lr=0.1, momentum=0.9)
    first = local_steps(model, batches[:3], optimizer="sgd", lr=0.1, momentum=0.9, keep_state=True)
    assert first.inner_state is not None and {k.rsplit(".", 1)[1] for k in first.inner_state} == {"momentum_buffer"}
    _apply(model, first.update)
    kept = local_steps(model, batches[3:], optimizer="sgd", lr=0.1, momentum=0.9, state=first.inner_state,
                       keep_state=True)
    reset = local_steps(model, batches[3:], optimizer="sgd", lr=0.1, momentum=0.9)
    for n in whole.update:
        assert torch.allclose(first.update[n] + kept.update[n], whole.update[n], atol=1e-6), n
        assert not torch.allclose(first.update[n] + reset.update[n], whole.update[n], atol=1e-4), n
    with pytest.raises(ValueError, match=r"'2\.weight'.*shapes"):
        local_steps(model, batches, optimizer="sgd", lr=0.1, momentum=0.9,
                    state={**first.inner_state, "2.weight.momentum_buffer": torch.zeros(3, 9)})


def test_an_inner_state_that_does_not_fit_the_model_is_refused_naming_the_tensor() -> None:
    from pipeline.training import local_steps

    model, batches = _tiny_model_and_batches(2)
    state = local_steps(model, batches, optimizer="adamw", lr=1e-2, keep_state=True).inner_state
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    bad_shape = {**state, "2.weight.exp_avg": torch.zeros(3, 9)}
    with pytest.raises(ValueError, match=r"'2\.weight'.*shapes"):
        local_steps(model, batches, optimizer="adamw", lr=1e-2, state=bad_shape)
    with pytest.raises(ValueError, match=r"'0\.bias' is incomplete"):
        local_steps(model, batches, optimizer="adamw", lr=1e-2,
                    state={k: v for k, v in state.items() if k != "0.bias.exp_avg_sq"})
    with pytest.raises(ValueError, match="does not have.*'head"):
        local_steps(model, batches, optimizer="adamw", lr=1e-2, state={**state, "head.weight.step": torch.ones(())})
    for n, p in model.named_parameters():  # nothing was stepped
        assert torch.equal(p, before[n]), n
