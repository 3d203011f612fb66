"""Telemetry: metric definitions on an injected registry (and, later, logging and the HTTP server)."""
