"""Benchmarks: `python -m bench` starts a scripted upstream, the gateway and a load generator on loopback."""
