"""Sink-aware core attention over CA-tasks (design §2-3)."""
