"""Answering from the catalog: the DNS endpoint, the HTTP API, and /v1/health's status."""
