"""The async step plan: one global order over the shards' steps, results accepted out of order exactly once."""

from __future__ import annotations

from pipeline import async_plan


def test_the_frontier_is_the_first_unaccepted_steps_of_the_global_order() -> None:
    plan = dict(shards=2, local_steps=1, steps_per_shard=10, lookahead=True)
    assert async_plan.frontier({}, set(), **plan) == [(0, 0), (1, 0)]
    # A slow worker holds shard 0's step 0 while shard 1's steps 0 and 1 were accepted: the free worker gets
    # shard 0's step 1, not shard 1's step 2: every shard's data advances at the same pace.
    assert async_plan.frontier({1: 2}, set(), **plan) == [(0, 0), (0, 1)]
    # Shard 0's step 1 accepted ahead of its step 0.
    assert async_plan.frontier({1: 2}, {(0, 1)}, **plan) == [(0, 0), (0, 2)]


def test_the_frontier_stops_at_each_shards_budget_and_counts_in_local_steps() -> None:
    plan = dict(shards=2, local_steps=4, steps_per_shard=8, lookahead=True)
    assert async_plan.frontier({0: 4}, set(), **plan) == [(1, 0), (0, 4)]
    assert async_plan.frontier({0: 8, 1: 4}, set(), **plan) == [(1, 4)]
    assert async_plan.frontier({0: 8, 1: 8}, set(), **plan) == []


def test_without_lookahead_each_shard_computes_only_its_next_step() -> None:
    plan = dict(shards=3, local_steps=1, steps_per_shard=10, lookahead=False)
    assert async_plan.frontier({0: 5, 2: 1}, set(), **plan) == [(0, 5), (1, 0), (2, 1)]


def test_a_step_is_awaited_once_and_the_mark_moves_past_consecutive_accepted_steps() -> None:
    assert async_plan.awaited(2, {4}, 3) and not async_plan.awaited(2, {4}, 4) and not async_plan.awaited(2, {4}, 1)
    assert async_plan.accept(2, set(), 4, 1) == (2, {4})  # out of order: held above the mark
    assert async_plan.accept(2, {3, 4, 6}, 2, 1) == (5, {6})  # 2 fills the gap: the mark moves past 2, 3, 4


def test_marks_after_a_count_of_accepted_steps_follow_the_global_order() -> None:
    assert async_plan.marks_after(0, 3, 1) == {0: 0, 1: 0, 2: 0}
    assert async_plan.marks_after(7, 3, 2) == {0: 6, 1: 4, 2: 4}  # steps 0..6 of the order: 3, 2, 2 per shard
    assert sum(m // 2 for m in async_plan.marks_after(7, 3, 2).values()) == 7


def test_no_more_steps_are_in_flight_than_there_are_live_shard_workers() -> None:
    plan = dict(shards=4, local_steps=1, steps_per_shard=10, lookahead=True)
    assert async_plan.frontier({}, set(), **plan) == [(0, 0), (1, 0), (2, 0), (3, 0)]  # workers unknown
    assert async_plan.frontier({}, set(), **plan, workers=2) == [(0, 0), (1, 0)]
    assert async_plan.frontier({}, set(), **plan, workers=9) == [(0, 0), (1, 0), (2, 0), (3, 0)]
