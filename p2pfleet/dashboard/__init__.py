"""The owner's dashboard: one read-only HTML page about this node, built from the node's
status (control socket) and its ledger, served on loopback only (`p2pfleet node dashboard`).
"""
