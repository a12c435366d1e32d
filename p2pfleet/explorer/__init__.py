"""The network explorer: a light client that maps the fleet without trusting any node.

- `evidence`: checks the explorer makes itself on raw DHT copies and evidence reports (pure);
- `model`: peers, jobs, totals and history as plain data (pure);
- `crawler`: walks the DHT in client mode, reads and verifies records, asks node_info;
- `views`: the terminal table and the JSON document;
- `web`: the ASGI dashboard, JSON API, OpenAPI document and /metrics (served by hypercorn);
- `jobs_page`, `mesh_page`, `evidence_page`, `charts`: the web page's jobs view, mesh
  picture, evidence pages and capacity chart (pure builders; `static/explorer.js` only
  enhances the chart);
- `metrics`: the totals as Prometheus text.

specs/explorer.md describes what it shows and why it can be believed.
"""
