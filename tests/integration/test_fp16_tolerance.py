"""Evidence for exec.outputs' tolerance on real models: an honest run at another
optimisation level stays within it; a run with every float constant rounded to float16
(the cheap substitute of notes/onnx.md) falls outside it, except on the models listed in
`test_where_the_fp16_cheat_is_not_caught`. Agreement is judged per sample (issue 12), so
the same holds sample by sample: honest noise far inside the tolerance for every sample,
the fp16 cheat outside it for the measured share of samples (tools/measure_tolerance.py),
also for small samples beside a huge one."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from exec_models import MODELS, digits, fp16_weights
from p2pfleet.exec.outputs import TOLERANCE, compare_outputs, sample_errors
from workerkit import mlp_model


def run(model: bytes, name: str, x: np.ndarray, level: str = "all") -> dict[str, np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {name: x})))


#: Measured largest sample error of the fp16 run (onnxruntime 1.32, x86-64, 64 samples;
#: against the shard's largest value, the rule before issue 12, it was 6.7e-4, 5.1e-4,
#: 3.0e-4, 2.5e-4 and 1.6e-4).
FP16_ERRORS = {"small": 1.4e-3, "canary": 1.0e-3, "mlp784": 6.3e-4, "digits": 5.8e-4, "magika": 1.7e-4}


@pytest.mark.parametrize("name", sorted(FP16_ERRORS))
def test_fp16_weights_fall_outside_the_tolerance(name):
    model, input_name, inputs = MODELS[name]()
    x = inputs(64)
    honest = run(model, input_name, x)
    other_level = compare_outputs(honest, run(model, input_name, x, level="disable"))
    assert other_level.within_tolerance, other_level
    cheat = compare_outputs(honest, run(fp16_weights(model), input_name, x))
    assert not cheat.within_tolerance, cheat
    assert cheat.max_norm_error > 4 * TOLERANCE, cheat  # a margin, not a near miss
    assert cheat.max_norm_error > 10 * other_level.max_norm_error


#: Measured share of samples whose own fp16 error exceeds TOLERANCE (256 samples,
#: tools/measure_tolerance.last.json). magika's outputs are near-certain softmax rows that
#: fp16 weights barely move: a shard of it is caught by its few sensitive samples only.
FP16_SAMPLE_SHARE = {"small": 0.85, "canary": 1.0, "mlp784": 1.0, "digits": 0.88, "magika": 0.016}


def per_sample(a: dict, b: dict) -> np.ndarray:
    """Each sample's error: the largest over the float outputs of its own error."""
    errs = [sample_errors(a[k], b[k]) for k in sorted(a) if a[k].dtype.kind == "f"]
    return np.max(errs, axis=0)


def run_one_by_one(model: bytes, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    parts = [run(model, name, x[i:i + 1]) for i in range(len(x))]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("name", sorted(FP16_SAMPLE_SHARE))
def test_sample_by_sample_honest_noise_is_far_inside_and_fp16_outside(name):
    model, input_name, inputs = MODELS[name]()
    x = inputs(256)  # the canary's batch is fixed at 8
    honest = run(model, input_name, x)
    noise = [per_sample(honest, run(model, input_name, x, level="disable"))]
    if name != "canary":  # a batch of one: the worst honest difference measured (magika)
        noise.append(per_sample(honest, run_one_by_one(model, input_name, x)))
    assert max(float(e.max()) for e in noise) <= TOLERANCE / 2
    cheat = per_sample(honest, run(fp16_weights(model), input_name, x))
    caught = float(np.mean(cheat > TOLERANCE))
    assert caught >= 0.75 * FP16_SAMPLE_SHARE[name], (caught, np.percentile(cheat, [0, 50, 100]))
    assert cheat.max() > 4 * TOLERANCE


def test_fp16_on_the_small_samples_beside_a_huge_one_is_caught_sample_by_sample():
    """A cheat that runs fp16 weights on the small samples and the real model on one huge
    sample per shard: relative to the shard's largest value (the old rule) its error is
    invisible; by each sample's own magnitude every small sample is caught."""
    model = mlp_model(seed=3)
    x = np.random.default_rng(5).standard_normal((90, 16)).astype(np.float32)
    huge = np.arange(0, 90, 30)
    x[huge] *= np.float32(1e6)
    honest = run(model, "x", x)["y"]
    cheat = run(fp16_weights(model), "x", x)["y"]
    cheat[huge] = honest[huge]
    for first in range(0, 90, 30):
        h, c = honest[first:first + 30], cheat[first:first + 30]
        assert np.abs(c - h).max() / np.abs(h).max() < TOLERANCE / 100  # the old rule: agree
        assert not compare_outputs({"y": h}, {"y": c}).within_tolerance
    errs = sample_errors(honest, cheat)
    small = np.setdiff1d(np.arange(90), huge)
    assert (errs[small] > TOLERANCE).all() and (errs[huge] == 0).all()


def _only_output(model: bytes, keep: str) -> bytes:
    m = onnx.load_from_string(model)
    kept = [o for o in m.graph.output if o.name == keep]
    del m.graph.output[:]
    m.graph.output.extend(kept)
    return m.SerializeToString()


def test_where_the_fp16_cheat_is_not_caught():
    """A tolerance check alone cannot catch the fp16 substitute (known-answer samples and
    trust must): (1) a classifier publishing only its integer labels: fp16 weights give
    the same labels; (2) a model whose weights are already float16 values (trained or
    stored in fp16): rounding changes nothing, the 'cheat' computes the same function."""
    model, input_name, inputs = digits()
    x = inputs(256)
    labels_only = _only_output(model, "label")
    same = compare_outputs(run(labels_only, input_name, x), run(fp16_weights(labels_only), input_name, x))
    assert same.exact, same
    already_fp16 = fp16_weights(MODELS["mlp784"]()[0])
    xs = MODELS["mlp784"]()[2](64)
    same = compare_outputs(run(already_fp16, "x", xs), run(fp16_weights(already_fp16), "x", xs))
    assert same.exact, same


def test_the_measuring_tool_reports_per_sample_figures(tmp_path):
    """tools/measure_tolerance.py (the source of the numbers in verification.md section 2)
    runs and says the same as the tests above, on a small model and on the attack inputs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "m.json"
    subprocess.run([sys.executable, str(root / "tools" / "measure_tolerance.py"), "--samples", "64",
                    "--models", "small,workerkit_mlp_attack", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["tolerance"] == TOLERANCE
    for name in ("small", "workerkit_mlp_attack"):
        m = report["models"][name]
        assert m["summary"]["honest_max_sample_error"] < TOLERANCE / 2
        assert m["fp16"]["sample_error"]["max"] > 4 * TOLERANCE
    # on the attack inputs, fp16 is caught on (nearly) every sample by its own magnitude
    assert report["models"]["workerkit_mlp_attack"]["fp16"]["share_above_tolerance"] >= 0.95
