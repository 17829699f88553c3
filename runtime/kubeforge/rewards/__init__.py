"""Reward role: reward functions served over HTTP, batched."""
