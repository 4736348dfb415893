"""reuseport-ctl: see and steer how Linux spreads connections over a
SO_REUSEPORT group."""


def main() -> None:
    """The console entry point. Importing the verbs (click, rich, pyroute2,
    psutil) takes seconds on a loaded machine: a Ctrl-C meanwhile ends with
    the same line and status as one during the work, not a traceback."""
    import sys
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("reuseport-ctl: interrupted\n")
        sys.exit(130)
    cli_main()
