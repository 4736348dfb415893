"""`reuseport-ctl verify`: a reuseport conformance suite over real sockets and
BPF. checks.py is the registry; one module per area holds the checks;
runner.py runs each in its own process and network namespace."""
