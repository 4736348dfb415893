"""Lookup and wakeup probes, each with a chain of attach strategies picked at
run time from what the kernel offers (strategy.py)."""
