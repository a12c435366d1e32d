"""Quorum rules: pairwise agreement of distinct workers, the winning output, valid results."""

from __future__ import annotations

import pytest

from p2pfleet.core.verify import (ESTABLISHED, FRESH, TRUSTED, Vote, choose_output, find_quorum,
                                  is_valid, largest_agreeing)


def v(n: int, worker: str, digest: str, agrees: str = "", ok: bool = True, prefix: str = "",
      standing: int = ESTABLISHED) -> Vote:
    return Vote(bytes([n]) * 16, worker.encode() * 32, digest.encode() * 32, n,
                frozenset(bytes([int(c)]) * 16 for c in agrees), ok,
                prefix or f"10.0.{ord(worker[0])}.0/24", standing)


def test_equal_digests_form_a_quorum_in_arrival_order():
    votes = [v(1, "a", "x"), v(2, "b", "y"), v(3, "c", "x")]
    group = find_quorum(votes, 2)
    assert [g.order for g in group] == [1, 3]
    assert choose_output(group).order == 1


def test_tolerance_agreement_counts_both_ways_and_the_majority_digest_wins():
    votes = [v(1, "a", "x", agrees="2"), v(2, "b", "y"), v(3, "c", "y", agrees="1")]
    group = find_quorum(votes, 3)
    assert group is not None
    assert choose_output(group).digest == b"y" * 32  # two of three share it


def test_one_worker_never_counts_twice_and_bad_votes_never_count():
    assert find_quorum([v(1, "a", "x"), v(2, "a", "x")], 2) is None
    assert find_quorum([v(1, "a", "x"), v(2, "b", "x", ok=False)], 2) is None
    assert largest_agreeing([v(1, "a", "x"), v(2, "b", "y"), v(3, "c", "y")]) == 2


def test_the_replica_rules_hold_on_the_quorum_itself():
    # Two identities behind one prefix agree on an output: never a quorum on their own,
    # however their leases were issued (an expired lease's late result included).
    same = [v(1, "a", "w", prefix="10.9.9.0/24"), v(2, "b", "w", prefix="10.9.9.0/24")]
    assert find_quorum(same, 2) is None and largest_agreeing(same) == 1
    # Two fresh identities in two prefixes: not a quorum either.
    fresh = [v(1, "a", "w", standing=FRESH), v(2, "b", "w", standing=FRESH)]
    assert find_quorum(fresh, 2) is None
    # One fresh and one established in other prefixes: a quorum.
    assert find_quorum([v(1, "a", "w", standing=FRESH), v(2, "b", "w")], 2) is not None
    # A later honest result pairs with the established one of the same-prefix pair.
    votes = same + [v(3, "c", "w")]
    assert [g.order for g in find_quorum(votes, 2)] == [1, 3]


def test_the_user_gets_the_best_standing_output_not_the_first():
    # A fresh identity's near miss (within tolerance) arrives first; the established
    # worker's exact output is what the user gets.
    group = find_quorum([v(1, "a", "x", agrees="2", standing=FRESH), v(2, "b", "y")], 2)
    assert choose_output(group).worker == b"b" * 32
    # The publisher's trusted machine wins over established ones.
    group = find_quorum([v(1, "a", "x", agrees="2"), v(2, "b", "y", standing=TRUSTED)], 2)
    assert choose_output(group).digest == b"y" * 32
    # Among equals the output bit-identical to the most results of the shard wins, counting
    # results outside the group too.
    votes = [v(1, "a", "x", agrees="23"), v(2, "b", "y", agrees="1"), v(3, "c", "y", agrees="1")]
    group = find_quorum(votes, 2)
    assert [g.order for g in group] == [1, 2]
    assert choose_output(group, votes).digest == b"y" * 32


def test_validity_is_agreement_with_the_accepted_output():
    acc = v(1, "a", "x")
    assert is_valid(v(2, "b", "x"), acc)
    assert is_valid(v(3, "c", "z", agrees="1"), acc)
    assert not is_valid(v(4, "d", "z"), acc)
    assert not is_valid(v(5, "e", "x", ok=False), acc)


def test_a_quorum_needs_at_least_one_result():
    with pytest.raises(ValueError, match="at least one"):
        find_quorum([], 0)


def test_largest_agreeing_of_at_most_one_ok_vote_without_the_search():
    """The short cut for shards with one ok result (most of them while a job runs) gives
    what the search gives: a bad vote never counts, a trusted count needs a trusted vote."""
    a, bad = v(1, "a", "x"), v(2, "b", "y", ok=False)
    t = v(3, "t", "x", standing=TRUSTED)
    for votes, trusted, want in (([], False, 0), ([bad], False, 0), ([a], False, 1),
                                 ([a, bad], False, 1), ([a], True, 0), ([t], True, 1),
                                 ([t, bad], True, 1)):
        assert largest_agreeing(votes, trusted=trusted) == want, (votes, trusted)
        assert (find_quorum(votes, 1, trusted=trusted) is not None) == (want == 1)


# --- the data side: shards with hidden known answers, and checking a result's outputs ---
import random  # noqa: E402

import numpy as np  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from p2pfleet.exec.outputs import concat_batches, encode_tensors, tensors_digest  # noqa: E402
from p2pfleet.publisher.jobs import (  # noqa: E402
    JobSpec, JobSpecError, build_job, check_result_outputs, run_locally, strip_known_answers)

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 7


def linear_model() -> bytes:
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          [numpy_helper.from_array(W, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m.SerializeToString()


X = np.random.default_rng(0).standard_normal((25, 4)).astype(np.float32)


def test_bad_specs_are_named():
    with pytest.raises(JobSpecError, match="JobSpec.inputs"):
        build_job(JobSpec(linear_model(), {}), random.Random(0))
    with pytest.raises(JobSpecError, match="JobSpec.quorum"):
        build_job(JobSpec(linear_model(), {"x": X}, quorum=0), random.Random(0))
    with pytest.raises(JobSpecError, match="JobSpec.micro_batch"):
        build_job(JobSpec(linear_model(), {"x": X}, shard_size=1000, micro_batch=1), random.Random(0))
    with pytest.raises(JobSpecError, match="onnxruntime cannot run"):
        build_job(JobSpec(linear_model(), {"x": X.astype(np.float64)}), random.Random(0))


def honest_result(built, i, micro_batch=4):
    from p2pfleet.exec.outputs import decode_tensors

    x = decode_tensors(built.shard_blobs[i])["x"]
    batches = [run_locally(linear_model(), {"x": x[k:k + micro_batch]}, "all")
               for k in range(0, len(x), micro_batch)]
    blob = encode_tensors(concat_batches(batches))
    return blob, tuple(tensors_digest(b) for b in batches)


def check(built, i, blob, digests):
    from p2pfleet.exec.outputs import decode_tensors
    import hashlib

    return check_result_outputs(blob, digest=hashlib.sha256(blob).digest(), size=len(blob),
                                samples=built.samples[i], micro_batch=4, batch_digests=digests,
                                output_names=built.output_names, ka=built.shard_ka[i],
                                ka_expected=decode_tensors(built.ka_expected))


def test_known_answers_hide_in_shards_and_are_stripped_from_outputs():
    built = build_job(JobSpec(linear_model(), {"x": X}, shard_size=10, micro_batch=4,
                              known_answer_rows=2), random.Random(3))
    assert built.samples == (12, 12, 7) and all(built.known_answer)
    parts = []
    for i in range(3):
        blob, digests = honest_result(built, i)
        got = check(built, i, blob, digests)
        assert got.form_ok and got.known_answer_ok is True
        parts.append(strip_known_answers(got.outputs, built.shard_ka[i])["y"])
    expected = run_locally(linear_model(), {"x": X}, "all")["y"]
    assert np.allclose(np.concatenate(parts), expected, rtol=1e-6, atol=1e-6)


def test_wrong_outputs_fail_known_answers_and_lying_digests_fail_form():
    built = build_job(JobSpec(linear_model(), {"x": X}, shard_size=10, micro_batch=4),
                      random.Random(3))
    blob, digests = honest_result(built, 0)
    from p2pfleet.exec.outputs import decode_tensors

    y = np.array(decode_tensors(blob)["y"])
    cheap = encode_tensors({"y": (y.astype(np.float16)).astype(np.float32) * np.float32(1.001)})
    batches = [{"y": decode_tensors(cheap)["y"][k:k + 4]} for k in range(0, len(y), 4)]
    got = check(built, 0, cheap, tuple(tensors_digest(b) for b in batches))
    assert got.form_ok and got.known_answer_ok is False
    bad = check(built, 0, blob, digests[:-1] + (b"\0" * 32,))
    assert not bad.form_ok and "batch digest" in bad.why
    assert not check(built, 0, blob[:-1], digests).form_ok
