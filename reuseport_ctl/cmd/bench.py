"""reuseport-ctl bench: the server models and policies compared over a sweep
of load levels and per-request work."""
from __future__ import annotations

import json

import click
from click.core import ParameterSource

from ..errors import UserError
from ..signals import Stopped
from ._common import check_output_path, console, json_option
from ..experiments import bench as B
from ..experiments import long_lived as L
from ..workers.stall import DEFAULT as STALL_DEFAULT

EPILOG = """\b
Examples:
  reuseport-ctl bench --short-connections
      every model and policy, concurrency 1,4,16,64, work 0 and 100 µs, 3 repeats
  reuseport-ctl bench --models shared-accept,shared-epoll,reuseport --policies none \\
      --workers 4 --concurrency 1,64 --work-us 100 --short-connections --plot bench.png
      the seed's headline: one shared socket against a reuseport group
  reuseport-ctl bench --models reuseport --policies round-robin,least-loaded --json
      the eBPF policies against the kernel's hash, keep-alive, as JSON
  reuseport-ctl bench --stall --short-connections
      every model, and reuseport with kernel, round-robin, least-loaded, least-conns,
      each without and with worker 0 stopped 100 ms in every 500 ms (SIGSTOP/SIGCONT),
      the first stop as the load begins, every load 2 s (4 periods): Jain, p99 and max
      latency side by side, and how long the worker really was stopped
  reuseport-ctl bench --models reuseport --policies least-loaded --stall 1:50@200
  reuseport-ctl bench --stall --short-connections --repeat 1 --plot stall.png
      the same, and the latency CDFs (without and with the stall) per setup as a PNG
  reuseport-ctl bench --long-lived --plot live.png
      Envoy's long-lived cases: 2 and 17 keep-alive connections over 3 workers, opened in
      bursts of 4, a request per connection every 100 ms, then all dropped and reopened at
      once (the reconnect storm); kernel hash, round-robin and least-conns side by side, and
      the live connections per worker over time as a PNG
  reuseport-ctl bench --long-lived 100 --workers 8 --policies least-conns --repeat 5 --json

\b
Columns: conns/s, request latency p50/p99/p99.9/max (client side, from
connect() for a connection's first request), max:min (busiest worker's
connections over the idlest's; ∞: a worker got none), Jain's index, the
per-worker shares (busiest first), wakeups/conn (process wakeups caused by a
listener data-ready, per accepted connection: 1 is wake-one, N is the herd,
<1 means busy workers found connections without sleeping), EAGAIN/conn
(wakeups whose accept() found nothing), CPU % of one core (a client
process, the busiest worker, the acceptor; all: the whole machine's CPUs,
other tenants included) and who saturated (>= 90 % of a core: the
dispatcher's acceptor, the workers, the client; "machine": every CPU was
>= 90 % busy). Each cell is the median over the repeats, with the min-max.

\b
--stall columns: each setup without and with the stall (⏸): Jain, p99, p99.9
and max latency, the stalled worker's share of the connections, and stopped
ms ⏸: how long the worker really was stopped during the stalled load / what
the schedule promises for that load's length (medians); ⚠ marks a row whose
repeats were stopped for less than half of it (--json: stall_short), which
measured no stall.

\b
--long-lived columns: the even split (busiest first); the live connections
per worker, in slot order, after the bursts and after the storm, one group
per repeat (counted in the kernel as watch counts them; --no-probes: the
sockets each worker holds); ideal: repeats that ended exactly at the even
split; requests (answers counted by the client) and CPU % of one core of the
busiest / idlest worker in the hold after the bursts and after the storm
(medians); every request costs --work-us of busy CPU (default 1000 µs).
"""


def _policies(spec: str) -> list[str]:
    if spec.strip().lower() in ("", "none"):
        return []
    return B.split_policies(spec)


@click.command("bench", epilog=EPILOG)
@click.option("--models", default=",".join(B.DEFAULT_MODELS), show_default=True,
              help="Server models to compare, comma-separated.")
@click.option("--policies", default=None,
              help="Selection policies to run the reuseport model with, besides the "
                   "kernel's hash; 'none' for the hash alone.  [default: "
                   + ",".join(B.DEFAULT_POLICIES) + "; with --stall: "
                   + ",".join(B.STALL_POLICIES) + "; with --long-lived: "
                   + ",".join(L.DEFAULT_POLICIES) + "]")
@click.option("--workers", "-w", type=int, default=None,
              help="Worker processes, the same for every model.  [default: 4; with "
                   "--long-lived: 3]")
@click.option("--conns", type=int, default=None,
              help="Connections per load point.  [default: 2000; not with --stall: "
                   "there each load lasts --stall-periods stall periods, by the clock]")
@click.option("--concurrency", "-c", default=None,
              help="Client concurrency levels to sweep (connections in flight), "
                   "comma-separated.  [default: " + ",".join(map(str, B.DEFAULT_CONCURRENCY))
                   + "; with --stall: 16]")
@click.option("--work-us", default=None,
              help="Busy CPU per request in the worker, in µs, comma-separated: emulates "
                   "request processing.  [default: " + ",".join(map(str, B.DEFAULT_WORK_US))
                   + "; with --stall: 100; with --long-lived: one value, "
                   + str(L.DEFAULT_WORK_US) + "]")
@click.option("--stall", default=None, is_flag=False, flag_value=STALL_DEFAULT,
              metavar="SLOT:MS[@EVERY_MS]",
              help="Also run every setup with worker SLOT stopped (SIGSTOP) for MS ms in "
                   "every EVERY_MS ms (default 5 x MS) while the load runs; --stall alone: "
                   + STALL_DEFAULT + ". The first stop begins as the load begins, and "
                   "every load (without and with the stall) lasts --stall-periods full "
                   "periods, by the clock, so a stalled load always holds that many stops "
                   "(the table shows how long the worker really was stopped and flags a "
                   "load stopped for less than half of what was promised).")
@click.option("--stall-periods", type=int, default=None,
              help="--stall: how many stall periods (EVERY_MS) each load lasts.  [default: "
                   + str(B.STALL_PERIODS) + ", 2 s with --stall alone]")
@click.option("--long-lived", "long_lived", default=None, is_flag=False, flag_value="2,17",
              metavar="N[,N...]",
              help="Instead of the sweep: N keep-alive connections held over the workers "
                   "(opened in bursts, a trickle of requests, then a reconnect storm), for "
                   "the kernel's hash and each policy: live connections, requests and CPU per "
                   "worker. "
                   "--long-lived alone: 2,17 over 3 workers (Envoy's cases).")
@click.option("--hold", "hold_s", type=float, default=2.0, show_default=True,
              help="--long-lived: seconds of trickle before the storm, and again after it.")
@click.option("--burst", type=int, default=4, show_default=True,
              help="--long-lived: connections opened at once (a pool's burst).")
@click.option("--repeat", "-r", type=int, default=3, show_default=True,
              help="Repeats of every point (a spread, not one lucky number).")
@click.option("--short-connections", is_flag=True,
              help="One request per connection (the high-turnover case) instead of keep-alive.")
@click.option("--requests-per-conn", type=int, default=10, show_default=True,
              help="Keep-alive requests per connection (ignored with --short-connections).")
@click.option("--port", "-p", type=int, default=8080, show_default=True,
              help="Port every model serves on, in turn.")
@click.option("--cpus", default=None,
              help="Pin worker i to CPU list[i % len], e.g. 0,1 [default: no pinning].")
@click.option("--no-probes", is_flag=True,
              help="Do not count wakeups (no bcc needed); --long-lived: count the live "
                   "connections from the sockets each worker holds (sock_diag) instead.")
@click.option("--host-netns", is_flag=True,
              help="Run in the current network namespace instead of a private one.")
@json_option("Print a JSON list: one object per model, load point and repeat "
             "(--long-lived: per case, policy and repeat).")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png",
              help="Write the per-worker shares and latencies per model, side by side, to "
                   "a PNG; with --stall, the latency CDF of each setup without and with "
                   "the stall instead; with --long-lived, the live connections per worker "
                   "over time, one panel per case and policy.")
def bench(models, policies, workers, conns, concurrency, work_us, stall, stall_periods,
          long_lived, hold_s,
          burst, repeat, short_connections, requests_per_conn, port, cpus, no_probes,
          host_netns, as_json, plot_path):
    """Run the same load against each server model in turn (reuseport with the
    kernel's hash and with each policy, shared-accept, shared-epoll,
    shared-epoll-exclusive, dispatcher), over a sweep of client concurrency
    and per-request work, and compare throughput, latency, fairness of the
    per-worker distribution, wakeups per connection and saturation.

    With --long-lived: where long-lived connections end up instead, per
    worker and policy, after the bursts that open them and after a
    reconnect storm."""
    check_output_path(plot_path)
    if long_lived is not None:
        return _long_lived(long_lived, models, policies, workers, work_us, hold_s, burst,
                           repeat, port, cpus, no_probes, host_netns, as_json, plot_path)
    _refuse_given(("hold_s", "--hold"), ("burst", "--burst"),
                  why="{} is an option of --long-lived.")
    if workers is None:
        workers = 4
    from ..workers.stall import parse_stall
    from ..workers.supervisor import parse_cpus
    stalled = parse_stall(stall, workers if workers >= 1 else None) if stall else None
    if stalled:
        _refuse_given(("conns", "--conns"),
                      why="with --stall each load lasts --stall-periods stall periods (a "
                          "duration, so that every stalled load holds its stops), not a "
                          "number of connections: drop {}.")
    elif stall_periods is not None:
        raise UserError("--stall-periods is an option of --stall.")
    if policies is None:
        policies = ",".join(B.STALL_POLICIES if stalled else B.DEFAULT_POLICIES)
    if conns is None:
        conns = 2000
    if concurrency is None:
        concurrency = "16" if stalled else ",".join(map(str, B.DEFAULT_CONCURRENCY))
    if work_us is None:
        work_us = "100" if stalled else ",".join(map(str, B.DEFAULT_WORK_US))
    cfg = B.BenchConfig(
        setups=B.setups_for([m.strip() for m in models.split(",") if m.strip()],
                            _policies(policies)),
        workers=workers, conns=conns,
        concurrency=B.parse_int_list(concurrency, "--concurrency"),
        work_us=B.parse_int_list(work_us, "--work-us"), repeat=repeat,
        requests_per_conn=1 if short_connections else requests_per_conn,
        port=port, cpus=parse_cpus(cpus) if cpus else None, probes=not no_probes,
        stall=stalled,
        stall_periods=B.STALL_PERIODS if stall_periods is None else stall_periods)
    cfg.validate()
    if not host_netns:
        from ..kernel.netns import enter_private_netns
        enter_private_netns()
    # SIGTERM between two points: Interrupted, as Ctrl-C (cli.py)
    result = _progress(B.run_bench, cfg, cfg.total_points)
    if plot_path and result.points:
        from ..ui.bench_plot import plot_bench, plot_stall_cdf
        (plot_stall_cdf if stalled else plot_bench)(result, plot_path)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    else:
        from ..ui.bench_view import render_bench
        _print(render_bench(result), plot_path if result.points else None)
    if result.interrupted:
        raise Stopped(result.interrupted)       # after printing the points done


def _refuse_given(*options: tuple[str, str], why: str) -> None:
    """One sentence for the first option given on the command line that
    does not apply (why: a format with {} for its name)."""
    ctx = click.get_current_context()
    for param, name in options:
        if ctx.get_parameter_source(param) not in (None, ParameterSource.DEFAULT):
            raise UserError(why.format(name))


def _long_lived(spec, models, policies, workers, work_us, hold_s, burst, repeat, port, cpus,
                no_probes, host_netns, as_json, plot_path):
    from ..workers.supervisor import parse_cpus
    _refuse_given(("conns", "--conns"), ("concurrency", "--concurrency"), ("stall", "--stall"),
                  ("stall_periods", "--stall-periods"),
                  ("short_connections", "--short-connections"),
                  ("requests_per_conn", "--requests-per-conn"),
                  why="--long-lived holds its own connections: drop {}.")
    works = B.parse_int_list(work_us, "--work-us") if work_us else (L.DEFAULT_WORK_US,)
    if len(works) != 1:
        raise UserError("--long-lived takes one --work-us value, not a list.")
    given = [m.strip() for m in models.split(",") if m.strip()]
    if click.get_current_context().get_parameter_source("models") != ParameterSource.DEFAULT \
            and given != ["reuseport"]:
        raise UserError("--long-lived compares policies of a reuseport group: give "
                        "--models reuseport (or leave it out).")
    cfg = L.LongConfig(
        setups=B.setups_for(["reuseport"], _policies(
            ",".join(L.DEFAULT_POLICIES) if policies is None else policies)),
        conns=B.parse_int_list(spec, "--long-lived"),
        workers=L.DEFAULT_WORKERS if workers is None else workers, repeat=repeat,
        hold_s=hold_s, burst=burst, work_us=works[0], port=port,
        cpus=parse_cpus(cpus) if cpus else None, probes=not no_probes)
    cfg.validate()
    if not host_netns:
        from ..kernel.netns import enter_private_netns
        enter_private_netns()
    result = _progress(L.run_long, cfg, cfg.total_runs)
    if plot_path and result.runs:
        from ..ui.long_lived_plot import plot_long
        plot_long(result, plot_path)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
    else:
        from ..ui.long_lived_view import render_long
        _print(render_long(result), plot_path if result.runs else None)
    if result.interrupted:
        raise Stopped(result.interrupted)


def _print(renderable, plot_path) -> None:
    out = console(width=160)
    out.print(renderable)
    if plot_path:
        out.print(f"plot: {plot_path}")


def _progress(run, cfg, total: int):
    """run(cfg, on_done, on_start) under a progress bar on stderr (refreshed
    by hand: no thread, because the supervisor forks)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)
    err = Console(stderr=True)
    if not err.is_terminal:
        return run(cfg)
    with Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=err, transient=True,
                  auto_refresh=False) as bar:
        task = bar.add_task("", total=total)

        def start(done, label):
            bar.update(task, completed=done, description=label)
            bar.refresh()

        def point(done, total, p):
            bar.update(task, completed=done)
            bar.refresh()
        return run(cfg, point, start)


COMMANDS = [bench]
