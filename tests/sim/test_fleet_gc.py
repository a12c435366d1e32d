"""The fleet simulator makes no reference cycles: `Fleet.run` pauses the cyclic garbage
collector (its passes over millions of live records cost a tenth of the run), so a cycle
made per event would be memory never given back."""

from __future__ import annotations

import gc

from p2pfleet.sim import fleet as F
from p2pfleet.sim.traces import SHIPPED, load_traces


def test_a_run_leaves_no_cyclic_garbage_and_restores_the_collector():
    fleet = F.Fleet(F.FleetConfig(200, hours=6, cheaters=0.1, seed=3), load_traces(SHIPPED))
    gc.collect()
    assert gc.isenabled()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays listed
    try:
        fleet.run()
        assert gc.isenabled()
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    assert fleet.summary()["scheduler_calls"] > 1000  # the run did something
    assert found == [], f"{len(found)} objects in reference cycles, e.g. {type(found[0])}"
