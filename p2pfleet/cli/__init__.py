"""The `p2pfleet` command line (click). The entry point is `p2pfleet.cli.main:main`.

Commands live in one module per group (`cmd_node`, `cmd_key`, `cmd_config`); the shared
plumbing (global options, the `App` context object, `--json`, error handling) in `app`.
To add a group: write a `click.Group` in a new module and register it in `main.py`.
"""
