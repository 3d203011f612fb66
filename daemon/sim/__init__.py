"""A faithful offline simulator of the Fly platform: Machines API, fleet, releases and faults.

Nothing in the daemon's own code paths imports it; tests, benchmarks and `flywatch sim`/`demo` do.
"""
