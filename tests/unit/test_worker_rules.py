"""The worker's pure rules: whom to ask for work, back-off, and which lease batches to hold."""

from __future__ import annotations

import random

import pytest

from p2pfleet.core import worker as W
from p2pfleet.wire.kinds import Lease, LeaseBatch, Requirements

OFFER = W.Offer(sw_version="0.1.0", ort_version="1.23.2", memory_mb=2048)
REQ = Requirements(min_memory_mb=512, providers=(), min_sw_version="0.1.0", ort_versions="")
PUB_A, PUB_B, ME = b"A" * 32, b"B" * 32, b"M" * 32


def job(pub=PUB_A, job_id=b"j" * 16, left=5, req=REQ):
    return W.HeardJob(publisher=pub, job_id=job_id, shards_left=left, requirements=req,
                      heard_at=0.0)


def lease(job_id=b"j" * 16, lease_id=b"l" * 16, samples=100, micro_batch=10, first_batch=0,
          ort_versions="", model_size=1000):
    return Lease(lease_id=lease_id, job_id=job_id, shard=0, model_digest=b"m" * 32,
                 model_size=model_size, input_digest=b"i" * 32, input_size=100, input_sources=(),
                 token=b"t" * 16, deadline_ms=60_000, micro_batch=micro_batch, opt_level="all",
                 provider="CPUExecutionProvider", ort_versions=ort_versions, samples=samples,
                 first_batch=first_batch, credit=5)


def choose(jobs, **kw):
    args = dict(allow=(PUB_A,), serve_anyone=False, over_cap=set(),
                backoff=W.PublisherBackoff(), now=0.0, rng=random.Random(1))
    args.update(kw)
    return W.choose_job(jobs, OFFER, **args)


def test_only_allowlisted_publishers_unless_serving_anyone():
    assert choose([job(PUB_B)]) is None
    assert choose([job(PUB_B)], serve_anyone=True).publisher == PUB_B
    # the allowlist comes first even when serving anyone
    for seed in range(20):
        assert choose([job(PUB_A), job(PUB_B)], serve_anyone=True,
                      rng=random.Random(seed)).publisher == PUB_A


@pytest.mark.parametrize("req, why", [
    (Requirements(min_memory_mb=4096, providers=(), min_sw_version="", ort_versions=""), "MiB"),
    (Requirements(min_memory_mb=0, providers=("CUDAExecutionProvider",), min_sw_version="",
                  ort_versions=""), "CUDA"),
    (Requirements(min_memory_mb=0, providers=(), min_sw_version="9.0", ort_versions=""), ">= 9.0"),
    (Requirements(min_memory_mb=0, providers=(), min_sw_version="", ort_versions=">=2"), "onnxruntime"),
])
def test_jobs_whose_requirements_the_node_misses_are_not_asked_for(req, why):
    assert why in W.unmet_requirement(req, OFFER)
    assert choose([job(req=req)]) is None


def test_no_work_left_over_cap_or_backing_off_means_no_request():
    assert choose([job(left=0)]) is None
    assert choose([job()], over_cap={PUB_A}) is None
    backoff = W.PublisherBackoff(base_s=60)
    until = backoff.no_work(PUB_A, 100.0, retry_after_s=0, rng=random.Random(0))
    assert 130.0 <= until <= 160.0
    assert choose([job()], backoff=backoff, now=until - 1) is None
    assert choose([job()], backoff=backoff, now=until) is not None


def test_backoff_doubles_to_four_hours_and_respects_retry_after():
    backoff, rng = W.PublisherBackoff(base_s=60), random.Random(3)
    delays = [backoff.no_work(PUB_A, 0.0, 0, rng) for _ in range(12)]
    assert all(30 <= d <= 4 * 3600 for d in delays)
    assert delays[-1] >= 2 * 3600  # capped at 4 h with jitter down to half
    assert backoff.no_work(PUB_B, 0.0, 7200.0, rng, exponential=False) == 7200.0
    backoff.got_work(PUB_A)
    assert backoff.ready(PUB_A, 0.0)


def batch(leases, req_id=b"r" * 16, worker=ME):
    return LeaseBatch(req_id=req_id, exp=10**13, worker=worker, leases=tuple(leases))


def check(body, signer=PUB_A, free_slots=1, known=frozenset({b"j" * 16})):
    return W.check_lease_batch(signer, body, publisher=PUB_A, req_id=b"r" * 16, own_key=ME,
                               free_slots=free_slots, known_jobs=set(known))


def test_a_good_batch_gives_its_leases():
    assert check(batch([lease()])) == [lease()]


@pytest.mark.parametrize("body, signer, reason", [
    (batch([lease()]), PUB_B, "not signed by the publisher"),
    (batch([lease()], req_id=b"x" * 16), PUB_A, "another request"),
    (batch([lease()], worker=b"o" * 32), PUB_A, "another worker"),
    (batch([lease(), lease(lease_id=b"k" * 16)]), PUB_A, "2 leases for 1 free slots"),
    (batch([lease(job_id=b"z" * 16)]), PUB_A, "did not announce"),
    (batch([lease(samples=10_000, micro_batch=1)]), PUB_A, "micro-batches, at most 256"),
    (batch([lease(first_batch=10)]), PUB_A, "past the last"),
])
def test_bad_batches_are_refused_naming_the_fault(body, signer, reason):
    with pytest.raises(W.LeaseRefused, match=reason) as info:
        check(body, signer=signer, free_slots=1)
    assert info.value.punish


def test_leases_the_node_cannot_run_are_handed_back_not_refused():
    kw = dict(ort_version="1.23.2", max_model_bytes=10_000, max_input_bytes=10_000)
    assert W.cannot_run(lease(), **kw) is None
    assert "outside" in W.cannot_run(lease(ort_versions=">=9"), **kw)
    assert "model of" in W.cannot_run(lease(model_size=20_000), **kw)


def test_cheat_modes_for_demos_are_checked_and_strategic_waits():
    from p2pfleet.live.cheats import check_cheat, cheats_now

    assert check_cheat("strategic:3") == "strategic:3"
    with pytest.raises(ValueError, match="unknown cheat"):
        check_cheat("lazy")
    assert [cheats_now("strategic:3", n) for n in range(5)] == [False, False, False, True, True]
    assert cheats_now("fp16", 0) and not cheats_now("", 10)


def test_progress_of_a_job_ends_the_back_off_of_its_publisher():
    backoff = W.PublisherBackoff(base_s=60)
    backoff.heard(PUB_A, b"j" * 16, 5)
    backoff.no_work(PUB_A, 0.0, 0, random.Random(0))
    assert not backoff.ready(PUB_A, 1.0)
    backoff.heard(PUB_A, b"j" * 16, 5)  # the same news: still backing off
    assert not backoff.ready(PUB_A, 1.0)
    backoff.heard(PUB_A, b"j" * 16, 4)  # a shard was accepted: ask again now
    assert backoff.ready(PUB_A, 1.0)


def test_fetch_time_and_hand_back_reasons():
    assert W.fetch_time_s(lease()) == 30.0  # half of a 60 s lease
    assert W.hand_back_reason("unplugged") == "unplugged"
    assert W.hand_back_reason("battery_hot") == "policy"


# --- cancels (work-and-leases.md, section 8) ----------------------------------------------------

JOB = b"j" * 16


def held(*pairs: tuple[bytes, str]) -> list[W.LeaseStatus]:
    return [W.LeaseStatus(lease_id, status) for lease_id, status in pairs]


def test_a_cancel_stops_only_the_signers_open_leases_it_names():
    mine = held((b"1" * 16, "queued"), (b"2" * 16, "running"), (b"3" * 16, "done"))
    assert W.leases_to_cancel(JOB, (b"1" * 16, b"x" * 16), mine) == (b"1" * 16,)
    assert W.leases_to_cancel(JOB, (), mine) == (b"1" * 16, b"2" * 16)  # the whole job
    assert W.leases_to_cancel(JOB, (b"3" * 16,), mine) == ()  # crossed its result: no fault


@pytest.mark.parametrize("names", [(), (b"x" * 16, b"y" * 16)])
def test_a_cancel_naming_none_of_the_signers_leases_is_refused(names):
    with pytest.raises(W.CancelRefused, match="none of them is a lease the signer issued"):
        W.leases_to_cancel(JOB, names, [])  # the signer issued this node nothing of the job
    with pytest.raises(W.CancelRefused):
        W.leases_to_cancel(JOB, (b"x" * 16,), held((b"1" * 16, "queued")))


# --- how many leases to hold (pipelining) -------------------------------------------------
def holding(*pairs):
    return [W.HeldLease(time_left_s=t, compute_s=c) for t, c in pairs]


def test_a_worker_that_knows_nothing_yet_holds_one_computing_and_one_fetched():
    assert W.leases_to_request([], W.Pace(), slots=4) == W.PIPELINE_DEPTH == 2
    assert W.leases_to_request(holding((600, None)), W.Pace(), slots=4) == 1
    assert W.leases_to_request(holding((600, None), (600, None)), W.Pace(), slots=4) == 0
    assert W.leases_to_request([], W.Pace(), slots=1) == 1  # never more than its slots
    assert W.leases_to_request([], W.Pace(), slots=0) == 0


def test_a_slow_fetch_or_a_request_gap_makes_it_hold_more_up_to_its_slots():
    fast = W.Pace(compute_s=10, fetch_s=2, deadline_s=600)
    assert W.leases_to_request(holding((600, 10)), fast, slots=8) == 1
    slow = W.Pace(compute_s=10, fetch_s=25, deadline_s=600)  # 1 + ceil(25/10) = 4 in all
    assert W.leases_to_request(holding((600, 10)), slow, slots=8) == 3
    assert W.leases_to_request(holding((600, 10)), slow, slots=3) == 2
    gap = W.Pace(compute_s=2, fetch_s=0.5, request_gap_s=10, deadline_s=600)  # 1 + ceil(10.5/2)
    assert W.leases_to_request([], gap, slots=16) == 7


def test_no_lease_is_asked_for_that_could_not_finish_before_its_deadline():
    pace = W.Pace(compute_s=100, fetch_s=1, request_gap_s=250, deadline_s=500)  # wants 4
    # 300 s of work ahead: a new lease would end at 400 <= 0.8 * 500, a second at 500 > 400
    assert W.leases_to_request(holding((600, 200), (600, 100)), pace, slots=8) == 1
    assert W.leases_to_request(holding((600, 250), (600, 100)), pace, slots=8) == 0


def test_nothing_more_while_a_held_lease_is_already_planned_past_its_deadline():
    pace = W.Pace(compute_s=10, fetch_s=1, deadline_s=600)
    assert W.leases_to_request(holding((100, 50), (40, None)), pace, slots=8) == 0  # 60 > 0.8*40
    assert W.leases_to_request(holding((100, 50)), pace, slots=8) == 1


def test_a_refusal_about_one_job_leaves_the_publishers_other_jobs_open():
    """A finished job the node still held an announcement of must not keep it from the
    publisher's next job (it did for 60-120 s: a job in a row waited that long)."""
    done, new = b"d" * 16, b"n" * 16
    backoff, rng = W.PublisherBackoff(base_s=60), random.Random(0)
    for j in (done, new):
        backoff.heard(PUB_A, j, 5)
    backoff.no_work(PUB_A, 0.0, 60.0, rng, job_id=done)
    assert not backoff.ready(PUB_A, 1.0, done) and backoff.ready(PUB_A, 1.0, new)
    picks = {choose([job(job_id=done), job(job_id=new)], backoff=backoff, now=1.0,
                    rng=random.Random(k)).job_id for k in range(20)}
    assert picks == {new}
    assert 30.0 <= backoff.until(PUB_A, done) <= 120.0 and backoff.until(PUB_A, new) is None
    backoff.heard(PUB_A, done, 0)  # its end announced: news clears the job's back-off ...
    assert choose([job(job_id=done, left=0)], backoff=backoff, now=1.0) is None  # ... 0 left
    # a refusal about the node (excluded, unreachable) closes the publisher's every job
    backoff.no_work(PUB_A, 0.0, 0.0, rng)
    assert not backoff.ready(PUB_A, 1.0, new) and not backoff.ready(PUB_A, 1.0)


def test_job_back_offs_are_bounded():
    backoff, rng = W.PublisherBackoff(base_s=60, max_jobs=8), random.Random(0)
    for i in range(100):
        backoff.no_work(PUB_A, float(i), 0.0, rng, job_id=i.to_bytes(16, "big"))
        backoff.heard(PUB_A, i.to_bytes(16, "big"), 3)
    assert len(backoff._job_until) <= 9 and len(backoff._left) <= 9
