"""The package layering holds: one core, two drivers (p2pfleet/live, p2pfleet/sim), faces on top.

The import contracts live in .importlinter at the repository root and are checked here with
import-linter's own `lint-imports`, so CI fails with its report when a module crosses a layer.
What an import graph cannot see (a core module drawing from the global random generator or
reading the wall clock through a module it may import) is checked on the source below.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "p2pfleet" / "core"
CLOCK_READS = {"now", "today", "utcnow", "utcfromtimestamp", "fromtimestamp", "monotonic",
               "perf_counter", "time_ns", "urandom", "getrandom"}


def lint_imports() -> str:
    script = Path(sys.executable).with_name("lint-imports")
    exe = str(script) if script.exists() else shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the test extra (make setup)"
    return exe


def test_import_contracts_are_kept():
    run = subprocess.run([lint_imports(), "--config", str(ROOT / ".importlinter"), "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"import contracts broken (.importlinter):\n{run.stdout}\n{run.stderr}"
    assert "0 broken" in run.stdout, run.stdout


def core_sources() -> list[Path]:
    files = sorted(CORE.glob("*.py"))
    assert files, f"no core modules under {CORE}"
    return files


def test_core_uses_random_only_as_the_type_of_a_handed_in_rng():
    """`random` may be named in core (random.Random, the seeded rng a caller hands in, and
    KeyedRandom's base class), never used to draw: random.random(), random.choice(...) and
    friends would be entropy of core's own."""
    misuse = []
    for path in core_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "random":
                misuse += [f"{path.name}:{node.lineno}: from random import "
                           + ", ".join(a.name for a in node.names)]
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "random" and node.attr != "Random"):
                misuse.append(f"{path.name}:{node.lineno}: random.{node.attr}")
    assert not misuse, "core draws randomness of its own:\n" + "\n".join(misuse)


def test_core_reads_no_clock():
    """The caller passes `now`; a call such as datetime.now() or date.today() in core would read
    the wall clock behind the import contracts' back (datetime is allowed for calendar
    arithmetic)."""
    reads = []
    for path in core_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in CLOCK_READS):
                reads.append(f"{path.name}:{node.lineno}: .{node.func.attr}()")
    assert not reads, "core reads a clock or the OS:\n" + "\n".join(reads)
