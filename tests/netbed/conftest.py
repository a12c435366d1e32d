"""The netbed tier: tests that build Linux network namespaces (tools/netbed). They need
root, iproute2 and nftables (CI runs as root and .ci/run installs them); elsewhere they skip,
naming what is missing. Helpers are in bedkit.py."""

from __future__ import annotations

import pytest
from bedkit import TOKENS, need_bed, netbed, root_veths


@pytest.fixture(scope="session", autouse=True)
def _root_veths_before() -> set[str]:
    return root_veths() if netbed.missing() is None else set()


@pytest.fixture
def new_bed():
    """Build a fresh bed: `with new_bed() as bed` (skips when the bed cannot run here)."""
    need_bed()

    def make() -> netbed.Bed:
        bed = netbed.Bed()
        TOKENS.append(bed.token)
        return bed
    return make


@pytest.fixture(scope="session")
def digits_job(tmp_path_factory):
    """The digits classifier, 400 inputs, and a local onnxruntime run's outputs by name."""
    import numpy as np
    import onnxruntime as ort

    from p2pfleet.zoo import digits

    model, name, inputs = digits()
    root = tmp_path_factory.mktemp("digits")
    X = inputs(400)
    (root / "model.onnx").write_bytes(model)
    np.save(root / "inputs.npy", X)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return root / "model.onnx", root / "inputs.npy", dict(zip(names, sess.run(names, {name: X})))
