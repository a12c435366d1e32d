"""The README's SDK quick-start runs as written against a local fleet of node processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]


def quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- quickstart -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its quick-start block"
    return match.group(1)


def test_readme_quickstart_runs_as_written(tmp_path):
    import onnxruntime as ort

    from p2pfleet.live.localfleet import LocalFleet
    from p2pfleet.zoo import digits

    model, name, inputs = digits()
    X = inputs(200)
    (tmp_path / "model.onnx").write_bytes(model)
    np.save(tmp_path / "inputs.npy", X)
    fleet = LocalFleet(tmp_path / "fleet", 3, network="readme",
                       settings={"publishers.serve_anyone": "true",
                                 "publishers.retry_base_s": "1"})
    fleet.start()
    try:
        (tmp_path / "quickstart.py").write_text(quickstart())
        env = {**os.environ, "P2PFLEET_NETWORK": "readme",
               "P2PFLEET_BOOTSTRAP": fleet.nodes[0].addr,
               "P2PFLEET_TRUSTED": " ".join(n.peer_id for n in fleet.nodes[:2])}
        proc = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "'state': 'done'" in proc.stdout
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        first = sess.get_outputs()[0].name
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {name: X})))[first]
        assert np.array_equal(np.load(tmp_path / "outputs.npy"), want)
    finally:
        for node in fleet.nodes:
            node.stop()
