"""Observation: health probes, PromQL queries and /metrics scrapes. Reads only; never changes a machine."""
