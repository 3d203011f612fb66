"""The only code that talks to the Fly Machines API: client, models, errors, rate limits, leases."""
