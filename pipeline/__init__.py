"""Distributed DCGAN training: WebDataset shards -> DeepSpeed engines -> MLflow."""

__version__ = "0.1.0"
