from __future__ import annotations

import random

import pytest

from common.errors import InvalidInput, ModelNotReady
from serving.router import Routing, choose_role


def test_zero_and_hundred_percent_are_absolute():
    assert {choose_role(0, None, d) for d in (0.0, 0.5, 0.999)} == {"stable"}
    assert {choose_role(100, None, d) for d in (0.0, 0.5, 0.999)} == {"canary"}
    assert choose_role(0, "user-1", 0.0) == "stable" and choose_role(100, "user-1", 0.9) == "canary"


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90])
def test_random_split_follows_the_percentage(percent):
    rng = random.Random(7)
    canary = sum(choose_role(percent, None, rng.random()) == "canary" for _ in range(20_000))
    assert abs(canary / 200 - percent) < 1.0


@pytest.mark.parametrize("percent", [5, 30, 70])
def test_sticky_keys_split_close_to_the_percentage(percent):
    canary = sum(choose_role(percent, f"user-{i}", 0.0) == "canary" for i in range(20_000))
    assert abs(canary / 200 - percent) < 1.5


def test_a_sticky_key_always_gets_the_same_side_whatever_the_draw():
    for i in range(200):
        key = f"caller-{i}"
        assert len({choose_role(37.5, key, draw) for draw in (0.0, 0.3, 0.6, 0.99)}) == 1


def test_raising_the_percentage_only_moves_keys_from_stable_to_canary():
    keys = [f"k{i}" for i in range(5_000)]
    at_10 = {k for k in keys if choose_role(10, k, 0.5) == "canary"}
    at_40 = {k for k in keys if choose_role(40, k, 0.5) == "canary"}
    assert at_10 < at_40


def test_routing_without_versions_is_not_ready():
    with pytest.raises(ModelNotReady):
        Routing().pick(None, 0.5)


def test_first_version_becomes_stable_even_when_loaded_as_canary():
    routing = Routing().with_version("v1", "canary")
    assert (routing.stable, routing.canary) == ("v1", None)
    assert routing.pick(None, 0.0) == ("v1", "stable", None)


def test_shadow_mode_answers_from_stable_and_mirrors_to_canary():
    routing = Routing().with_version("v1", "stable").with_version("v2", "canary").with_traffic(0, "shadow")
    assert routing.pick("anyone", 0.0) == ("v1", "stable", "v2")


def test_promote_and_rollback_leave_one_version_and_no_split():
    both = Routing().with_version("v1", "stable").with_version("v2", "canary").with_traffic(20, "split")
    promoted, rolled_back = both.promoted(), both.rolled_back()
    assert (promoted.stable, promoted.canary, promoted.canary_percent) == ("v2", None, 0.0)
    assert (rolled_back.stable, rolled_back.canary, rolled_back.canary_percent) == ("v1", None, 0.0)
    assert both.canary == "v2"  # the old snapshot is untouched


@pytest.mark.parametrize("percent, mode", [(-1, "split"), (100.5, "split"), (10, "mirror")])
def test_bad_traffic_settings_are_refused(percent, mode):
    with pytest.raises(InvalidInput):
        Routing().with_version("v1", "stable").with_version("v2", "canary").with_traffic(percent, mode)


def test_promote_without_canary_is_refused():
    with pytest.raises(InvalidInput, match="no canary"):
        Routing().with_version("v1", "stable").promoted()
