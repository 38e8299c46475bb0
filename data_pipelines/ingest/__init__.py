"""Ingestion (`xlsr-jax prepare`): audio files in common layouts -> ArrayRecord shards + dataset.json.

`layouts` finds the inputs, `decode` checks and encodes one file (in worker processes), `shards`
plans, writes and logs shards, and `prepare` runs it all. Import the submodule you need
(`from data_pipelines.ingest.prepare import prepare`); importing this package loads nothing.
"""
