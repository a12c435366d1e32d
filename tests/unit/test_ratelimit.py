"""The per-publisher token bucket, in virtual time."""

from p2pfleet.core.ratelimit import PublisherRateLimit


def test_burst_then_refill_at_the_rate():
    limit = PublisherRateLimit(per_minute=12, burst=3)
    assert [limit.allow(b"p", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow(b"q", 0.0)  # buckets are per publisher
    assert not limit.allow(b"p", 4.9)  # one token per 5 s
    assert limit.allow(b"p", 5.0)
    assert not limit.allow(b"p", 5.0)


def test_a_refused_call_spends_nothing():
    limit = PublisherRateLimit(per_minute=60, burst=1)
    assert limit.allow(b"p", 0.0)
    assert not limit.allow(b"p", 0.5)
    assert limit.allow(b"p", 1.0)  # the refusal at 0.5 s did not push the refill back


def test_available_tells_the_tokens_left_and_spends_nothing():
    rl = PublisherRateLimit(per_minute=12, burst=6)
    assert rl.available(b"p", 0.0) == 6.0
    for _ in range(5):
        assert rl.allow(b"p", 0.0)
    assert rl.available(b"p", 0.0) == 1.0
    assert rl.available(b"p", 0.0) == 1.0  # asking twice changes nothing
    assert rl.available(b"p", 5.0) == 2.0  # one token per 5 s
    assert rl.allow(b"p", 0.0) and not rl.allow(b"p", 0.0)
