"""Batch jobs: a multi-document recipe (mergekit-multi's format, with `sweep:` blocks) run as a DAG of
merges, each stage reused while its config, inputs and seed are unchanged."""
