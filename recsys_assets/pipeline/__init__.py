"""Batch pipeline: plain functions per stage, and the Dagster assets that call them."""
