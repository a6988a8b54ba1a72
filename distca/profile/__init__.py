"""Measurements of this device: attention throughput, communication bandwidth, training."""
