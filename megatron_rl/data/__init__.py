"""Datasets in the verl / Med-U1 parquet schema."""
