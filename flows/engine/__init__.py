"""The build's phases as plain functions over a BuildContext, run by the Prefect flow in flows/build.py:
context (the build folder, resume, the dataset lock), inputs (URL list or corpus -> input shards), ingest (download
tasks on Ray), runner (the stages as one Ray Data pipeline), decide (thresholds -> reject reasons), outputs (shards,
rejects, accounting, stats, manifest)."""
