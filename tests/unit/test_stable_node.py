"""core.reachability's stability rule: a node serves the DHT and relays only after being
public for a while and up for a while; a flip to private ends it at once; flapping waits
longer each time."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from p2pfleet.core.reachability import NO_STABILITY, Reach, Stability, StableRule

RULE = StableRule(public_s=600, uptime_s=1800, flap_window_s=3600, max_doublings=3)


def test_serves_only_after_public_time_and_uptime_and_says_why():
    s = Stability(started=0, rule=RULE)
    assert not s.observe(0, Reach.UNKNOWN)
    assert "not known yet" in s.why
    assert not s.observe(100, Reach.PUBLIC)
    assert not s.observe(280, Reach.PUBLIC)
    assert s.why == "public for 3 min; server after 10 min"
    assert not s.observe(700, Reach.PUBLIC)  # public 10 min, but up only 11.7 min
    assert "server after 30 min up" in s.why
    assert s.observe(1800, Reach.PUBLIC)
    assert s.why == "public for 28 min, up for 30 min"


def test_a_flip_to_private_ends_stability_at_once_and_flapping_waits_longer():
    s = Stability(started=0, rule=RULE)
    s.observe(0, Reach.PUBLIC)
    assert s.observe(2000, Reach.PUBLIC)
    assert not s.observe(2001, Reach.PRIVATE)
    assert s.why.startswith("private")
    s.observe(2002, Reach.PUBLIC)
    assert not s.observe(2002 + 600, Reach.PUBLIC)  # one recent drop: 20 min now
    assert "server after 20 min (1 recent drop(s) to private)" in s.why
    assert s.observe(2002 + 1200, Reach.PUBLIC)
    for t in (3300, 3400, 3500, 3600):  # three more drops: the wait is capped at 8 x 10 min
        s.observe(t, Reach.PRIVATE)
        s.observe(t + 1, Reach.PUBLIC)
    assert s.wait_s() == 8 * 600
    assert not s.observe(3601 + 2400, Reach.PUBLIC)  # 40 min public, 4 drops in the hour
    # drops count for the window (an hour) only, so the wait shrinks as they age
    assert s.observe(3601 + 3600, Reach.PUBLIC)


def test_off_serves_unless_private_as_before_the_rule():
    s = Stability(started=0, rule=NO_STABILITY)
    assert s.observe(0, Reach.UNKNOWN)
    assert s.observe(0, Reach.PUBLIC)
    assert not s.observe(1, Reach.PRIVATE)
    assert s.observe(2, Reach.PUBLIC)


@pytest.mark.parametrize("field,value", [("public_s", -1), ("uptime_s", float("nan")),
                                         ("flap_window_s", float("inf")), ("max_doublings", -1)])
def test_bad_rule_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        StableRule(**{field: value})


statuses = st.lists(st.tuples(st.floats(0, 500), st.sampled_from(list(Reach))), max_size=40)


@given(statuses)
def test_never_stable_while_private_nor_before_the_times(steps):
    s = Stability(started=0, rule=RULE)
    now, public_since = 0.0, None
    for dt, status in steps:
        now += dt
        stable = s.observe(now, status)
        public_since = (public_since if public_since is not None else now) \
            if status == Reach.PUBLIC else None
        if stable:
            assert status == Reach.PUBLIC
            assert now - public_since >= RULE.public_s and now >= RULE.uptime_s
