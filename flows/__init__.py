"""Prefect flows and the CLI: the only layer that talks to Prefect and Ray."""
from flows import env  # noqa: F401  (sets offline defaults first)
