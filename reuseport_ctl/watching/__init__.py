"""The watch engine: the live per-member view of a reuseport group, usable
without the CLI (cmd/watch.py and cmd/run.py are thin over it).

    from reuseport_ctl.watching import ForeignSource, Watch
    with Watch(ForeignSource(8080, "tcp", None, None), interval=1.0) as w:
        w.tick(wait=False)
        w.frame.rows          # one row per member socket (stats/live.py)

  sources.py   where the rows come from: any server (ForeignSource: the
               group's member sockets, the processes and threads that serve
               them, a dispatcher's children) or our own group (OwnSource)
  engine.py    Watch: the probe session, one observation per interval
               folded into a Frame, the outputs (dashboard, NDJSON, Prometheus)
  loop.py      the sampling loop, signals and q, `run --watch`
  checks.py    capabilities and option checks (one sentence each)
"""
from .checks import check_options, nothing_listening, require_probe_caps
from .engine import Watch
from .loop import Stop, loop, watch_own
from .sources import CpuSampler, ForeignSource, OwnSource

__all__ = ["Watch", "ForeignSource", "OwnSource", "CpuSampler", "Stop", "loop", "watch_own",
           "check_options", "nothing_listening", "require_probe_caps"]
