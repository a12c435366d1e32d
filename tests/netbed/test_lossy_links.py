"""A verified job completes with correct results over lossy, slow links: 5 % loss (the bed's
nftables drop rule) and 100 ms latency each way on every host's link (linkdelay: a
user-space layer-2 delay, since this kernel has no netem), so any two hosts are 200 ms apart
one way. Real `p2pfleet node start` and `job submit` processes, real onnxruntime."""

from __future__ import annotations

import json

import numpy as np

import netbed
from netbed.jobs import start_fleet, submit
from netbed.linkdelay import delay_link


def test_a_job_completes_over_5pct_loss_and_100ms_links(new_bed, tmp_path, digits_job):
    model, inputs, local = digits_job
    with new_bed() as bed:
        pub = bed.public("publisher")
        hosts = [bed.public(f"n{i}") for i in range(3)]
        for host in (pub, *hosts):
            bed.shape(host, loss_pct=5)
            delay_link(host, 100)
        nodes = start_fleet(hosts, tmp_path)
        out = tmp_path / "out"
        proc = submit(pub, tmp_path / "pub", model, inputs, out, nodes[0].addr,
                      "--shard-size", "50", "--micro-batch", "25", "--quorum", "2",
                      "--timeout", "400", *[a for n in nodes for a in ("--trust", n.peer_id)])
        stdout, stderr = proc.communicate(timeout=480)
        assert proc.returncode == 0, stderr[-3000:]
        report = json.loads(stdout)["report"]
        assert report["state"] == "done" and report["accepted"] == report["shards"] == 8
        assert report["failed"] == 0
        for name, want in local.items():
            assert np.array_equal(np.load(out / f"{name}.npy"), want), name
        assert all(n.stop() == 0 for n in nodes)
