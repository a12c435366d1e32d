"""The simulated driver: the pure core machines of `p2pfleet.core` run in virtual time.

design.md: the same state machines the live node drives (`p2pfleet/live/`, `net/`) are driven
here by discrete-event loops with a virtual clock and seeded randomness, so rules can be
tried on fleets far larger than a test can start. Modules here import `p2pfleet.core` and
the standard library only (never `net`, `exec`, `store` or `live`: a contract in
.importlinter), read no clock and draw no number they were not seeded for.

- `verification`: one publisher's scheduler against honest workers and adversaries
  (cheats, colluders, Sybil swarms, lease-expiry games, throwaway identities); counts
  wrong results accepted (specs/verification.md, section 5).
- `fleet`: a vehicle population (`population`, drawn from the traces `traces` reads) whose
  cars run the vehicle policy, publishers running `verification.Sim`, a link model and
  the publishers' uplinks; the `p2pfleet sim` command. `plot` draws its capacity.
- `replay`: event logs written by live publishers and nodes (specs/event-log.md) fed
  through the same machines, every decision compared; `p2pfleet sim replay`.
"""
