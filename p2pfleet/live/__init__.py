"""The live driver of p2pfleet/core: the volunteer node's runtime on real hosts.

p2pfleet/sim/ is the other driver (the same core rules in virtual time).
"""
