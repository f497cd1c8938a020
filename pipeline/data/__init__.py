"""Data: sources -> shards (prepare), shards -> batches (loader)."""
