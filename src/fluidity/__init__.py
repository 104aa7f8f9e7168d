"""Fluidity: a self-hosted tunnel over one mutual-TLS 1.3 link."""

__version__ = "0.1.0"
