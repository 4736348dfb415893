"""reuseport-ctl: see and steer how Linux spreads connections over a
SO_REUSEPORT group."""


def main() -> None:
    """The console entry point. Importing the verbs (click, rich, pyroute2,
    psutil) takes seconds on a loaded machine: a Ctrl-C, SIGTERM or SIGHUP
    meanwhile ends with the same line and status (128 + N) as one during
    the work, not a traceback or a silent death."""
    import sys

    from .signals import as_interrupts, exit_code, name, signum_of
    try:
        with as_interrupts():
            from .cli import OWN_PROCESS, main as cli_main
    except KeyboardInterrupt as e:
        sig = signum_of(e)
        sys.stderr.write("reuseport-ctl: interrupted" + ("" if sig == 2 else f" ({name(sig)})")
                         + "\n")
        sys.exit(exit_code(sig))
    OWN_PROCESS["on"] = True
    cli_main()
