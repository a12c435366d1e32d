"""The explorer's totals as Prometheus text (exposition format 0.0.4), for /metrics.

Same numbers as the terminal and the web pages: peers by state, capacity in samples/s and
estimated kW by state and hardware class, jobs with their progress, evidence counts.
"""

from __future__ import annotations

from typing import Any


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(doc: dict[str, Any]) -> str:
    """Prometheus text for a snapshot document (`Snapshot.to_json()`)."""
    lines: list[str] = []
    declared: set[str] = set()

    def metric(name: str, kind: str, help_text: str, value: float,
               labels: dict[str, str] | None = None) -> None:
        if name not in declared:
            declared.add(name)
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
        label = ""
        if labels:
            label = "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"
        lines.append(f"{name}{label} {value}")

    net = {"network": doc["network"]}
    metric("p2pfleet_explorer_crawls_total", "counter", "Crawls done.", doc["crawls"], net)
    metric("p2pfleet_explorer_crawl_seconds", "gauge", "Duration of the last crawl.",
           doc["duration_s"], net)
    metric("p2pfleet_explorer_peers_discovered", "gauge", "Peer ids found in the DHT.",
           doc["discovered"], net)
    metric("p2pfleet_explorer_sampled", "gauge", "1 when records were read for a sample only.",
           int(doc["sampled"]), net)
    for state, n in sorted(doc["counts"].items()):
        metric("p2pfleet_explorer_peers", "gauge", "Peers by state.", n, {**net, "state": state})
    for r in doc["totals"]:
        labels = {**net, "state": r["state"], "hw_class": r["hw_class"]}
        metric("p2pfleet_explorer_nodes", "gauge", "Nodes in the mesh by state and class.",
               r["nodes"], labels)
        metric("p2pfleet_explorer_capacity_samples_per_second", "gauge",
               "Benchmark capacity by state and hardware class, samples/s.",
               r["samples_per_s"], labels)
        metric("p2pfleet_explorer_capacity_estimated_kw", "gauge",
               "Estimated power of the nodes by state and hardware class, kW.", r["est_kw"], labels)
    cap = doc["capacity"]
    metric("p2pfleet_explorer_available_samples_per_second", "gauge",
           "Free capacity (nodes in state available), samples/s.", cap["available_samples_per_s"], net)
    metric("p2pfleet_explorer_used_samples_per_second", "gauge",
           "Used capacity (nodes in state busy), samples/s.", cap["used_samples_per_s"], net)
    for j in doc["jobs"]:
        labels = {**net, "publisher": j["publisher"], "job_id": j["job_id"]}
        metric("p2pfleet_explorer_job_shards", "gauge", "Shards of an announced job.",
               j["shards_total"], labels)
        metric("p2pfleet_explorer_job_shards_done", "gauge",
               "Shards of an announced job accepted (total - left).", j["shards_done"], labels)
    counts: dict[tuple[str, str], int] = {}
    for e in doc["evidence"]:
        source = "explorer" if e["verified_by_explorer"] else "publisher"
        counts[(e["kind"], source)] = counts.get((e["kind"], source), 0) + 1
    for (kind, source), n in sorted(counts.items()):
        metric("p2pfleet_explorer_evidence", "gauge",
               "Evidence items by kind and by who verified them.", n,
               {**net, "kind": kind, "verified_by": source})
    return "\n".join(lines) + "\n"
