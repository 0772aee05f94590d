"""Prefect flows (build, curate, refilter, demo, negatives, serve) and the CLI, over the Ray engine in flows/engine:
the only layer that talks to Prefect and Ray."""
from flows import env  # noqa: F401  (sets offline defaults first)
