"""Benchmark harness: Fluidity against direct, tinyproxy, squid, stunnel, ssh -L and pproxy.

Run with the project's venv from the repository root: ``python -m bench`` (``make bench``) or
``python -m bench --smoke`` (``make bench-smoke``). See docs/benchmarks.md.
"""
