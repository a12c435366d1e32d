"""Named scenarios of the fleet simulator (issue 16, item 5): `catalog` defines them,
`run.py` plays them and writes JSON (`last.json`)."""
