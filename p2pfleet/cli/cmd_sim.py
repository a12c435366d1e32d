"""`p2pfleet sim`: the fleet simulator (p2pfleet.sim.fleet) from the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .app import App, CliError, console, json_option, pass_app


@click.group("sim", invoke_without_command=True)
@click.option("--vehicles", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Vehicles in the fleet.")
@click.option("--hours", type=click.FloatRange(min=0, min_open=True, max=336), default=24.0,
              show_default=True, help="Simulated hours, from local midnight.")
@click.option("--cheaters", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0,
              show_default=True, help="Share of vehicles that cheat (the kinds of "
              "sim/verification.py in turn: random, fp16, copy, rows, strategic, colluder, "
              "sybil).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of every draw.")
@click.option("--per-publisher", type=click.IntRange(min=1), default=100, show_default=True,
              help="Vehicles served by each publisher.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Draw capacity available and used over the day: .png or "
              ".svg (labelled axes).")
@click.option("--traces", "trace_dir", type=click.Path(file_okay=False, exists=True,
              path_type=Path), default=None,
              help="A directory of vehicle traces to draw the population from "
              "(default: the shipped traces).")
@click.option("--population", type=click.Choice(["assumed", "survey"]), default="assumed",
              show_default=True, help="assumed: the habit mix of sim/population.py "
              "(home, work, fast charging; guesses); survey: every car a day drawn from "
              "the 200 survey car-weeks (docs/traces.md).")
@json_option
@click.pass_context
def sim_command(ctx: click.Context, vehicles: int, hours: float, cheaters: float, seed: int,
                per_publisher: int, plot_path: Path | None, trace_dir: Path | None,
                population: str) -> None:
    """Simulate a fleet in virtual time with the real core machines and print a summary
    (or, with `replay`, replay the event logs of live publishers and nodes)."""
    if ctx.invoked_subcommand is not None:
        return
    app = ctx.ensure_object(App)
    from ..sim import fleet as F
    from ..sim import plot
    from ..sim.population import Assumptions, TraceError
    from ..sim.traces import SHIPPED, load_survey_days, load_traces

    if plot_path is not None and plot_path.suffix.lower() not in (".png", ".svg"):
        raise CliError(f"--plot {plot_path}: the file must end in .png or .svg")
    try:
        traces = load_traces(trace_dir or SHIPPED)
        extra = {}
        if population == "survey":
            traces = {**traces, **load_survey_days()}
            extra["assumptions"] = Assumptions(habits=(("survey", 1.0),))
        cfg = F.FleetConfig(vehicles, hours=hours, cheaters=cheaters, seed=seed,
                            per_publisher=per_publisher, **extra)
        t0 = time.process_time()
        fleet = F.Fleet(cfg, traces)
    except TraceError as exc:
        raise CliError(f"--traces: {exc}") from None
    fleet.run(_progress() if not app.json else None)
    summary = fleet.summary()
    cpu = time.process_time() - t0
    summary["cpu_s"] = round(cpu, 2)
    summary["events_per_cpu_s"] = round(summary["events"] / cpu) if cpu else None
    if population != "assumed":
        summary["population"] = population
    if plot_path is not None:
        available, used = fleet.capacity()
        if plot_path.suffix.lower() == ".png":
            plot_path.write_bytes(plot.png(available, used, cfg.bin_s))
        else:
            plot_path.write_text(plot.svg(available, used, cfg.bin_s,
                                          f"{vehicles} vehicles, seed {seed}"))
        summary["plot"] = str(plot_path)
    app.emit(summary, lambda: _show(summary))


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("simulating"), BarColumn(), TextColumn("{task.percentage:>3.0f} %"),
                   TimeRemainingColumn(), console=console(), transient=True)
    task = None

    def update(done: int, total: int) -> None:  # vehicle-ms simulated (Fleet.run)
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("sim", total=total)
        bar.update(task, completed=done)
        if done >= total:
            bar.stop()

    return update


def _show(s: dict) -> None:
    from rich.table import Table

    out = console()
    who = f" ({s['population']} population)" if "population" in s else ""
    out.print(f"[bold]{s['vehicles']} vehicles[/]{who}, {s['hours']:g} h, seed {s['seed']}, "
              f"{s['cheaters']} cheaters, {s['publishers']} publishers "
              f"({s['cpu_s']} s CPU, {s['events']} events)")
    rows = [
        ("verified samples", s["verified_samples"]),
        ("shards accepted / failed", f"{s['shards_accepted']} / {s['shards_failed']}"),
        ("wrong results accepted", f"{s['wrong_accepted']} (of {s['wrong_results']} wrong "
                                   f"results; {s['cheaters_excluded']} cheaters excluded)"),
        ("effective replication", s["effective_replication"]),
        ("energy per vehicle", f"{s['energy_wh_per_vehicle']} Wh"),
        ("credit per honest vehicle", s["credit_per_honest_vehicle"]),
        ("work lost to unplugging", f"{s['work_lost_to_unplugging_hours']} of "
                                    f"{s['compute_hours']} compute hours"),
        ("time to result p50/p90/p99", " / ".join(
            f"{v:g} s" if v is not None else "-" for v in s["time_to_result_s"].values())),
        ("publisher uplink", f"{s['publisher_uplink']['gb_sent']} GB, "
                             f"{s['publisher_uplink']['mean_use']:.1%} of capacity"),
    ]
    t = Table(show_header=False)
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)
    h = Table("hour", "usable", "computing", "GW at 10^8 cars", title="by hour of day")
    for r in s["by_hour"]:
        h.add_row(f"{r['hour']:02d}", f"{r['usable_share']:.1%}", f"{r['used_share']:.1%}",
                  f"{r['gw_at_1e8']:g}")
    out.print(h)
    if "plot" in s:
        out.print(f"plot: {s['plot']}")


@sim_command.command("replay")
@click.argument("logs", nargs=-1, required=True,
                type=click.Path(dir_okay=False, exists=True, path_type=Path))
@json_option
@pass_app
def replay_command(app: App, logs: tuple[Path, ...]) -> None:
    """Replay event logs of live publishers (`job ... --event-log`) and nodes
    (`node.event_log`) through the same core machines and check every decision.

    Exit status 0 when every decision is the same, 1 at the first divergence (printed with
    the event and both sides), 2 when a log cannot be read (the line is named)."""
    from ..sim.replay import LogError, replay

    try:
        report = replay(logs)
    except LogError as exc:
        raise CliError(str(exc)) from None
    out = report.as_dict()
    app.emit(out, lambda: _show_replay(out))
    if report.divergence is not None:
        raise SystemExit(1)


def _show_replay(r: dict) -> None:
    from rich.markup import escape

    out = console()
    t = r["totals"]
    out.print(f"{len(r['logs'])} log(s), {r['segments']} machine start(s), {r['events']} "
              f"events, {r['decisions']} decisions compared")
    d = r["divergence"]
    if d is None:
        out.print("[bold green]identical[/]: every replayed decision is the logged one")
    else:
        out.print(f"[bold red]diverged[/] at {escape(d['log'])} line {d['line']} "
                  f"(event {d['index']}):")
        for name in ("event", "logged", "replayed"):  # raw JSON: no rich markup in it
            out.print(f"  {name + ':':9} {json.dumps(d[name], sort_keys=True)}", markup=False,
                      highlight=False, soft_wrap=True)
        k = d["first_difference"]
        out.print(f"  first different effect: {k}")
        for name in ("logged", "replayed"):
            side = d[name]
            if isinstance(side, list):
                shown = json.dumps(side[k], sort_keys=True) if k < len(side) else "(none)"
                out.print(f"    {name + ':':9} {shown}", markup=False, highlight=False,
                          soft_wrap=True)
        out.print("totals up to there:")
    keys = ("leases", "refusals", "accepts", "reopened", "shards_failed", "exclusions",
            "leases_cancelled", "payments", "credit", "jobs_done", "compute_starts",
            "compute_stops", "mesh_joins", "mesh_leaves", "receipts", "credit_received")
    out.print("  " + ", ".join(f"{k} {t[k]}" for k in keys if k in t))
    for job, c in r["jobs"].items():
        out.print(f"  job {job[:16]}: {c['accepted']}/{c['shards']} accepted, {c['failed']} "
                  f"failed, {c['leases']} leases, {c['invalid']} rejected, {c['paid']} paid")
