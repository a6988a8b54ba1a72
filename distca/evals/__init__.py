"""Synthetic long-context evaluation tasks and scoring."""
