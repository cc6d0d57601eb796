"""Datasets (TFDS builders) and the sharded input pipeline."""
