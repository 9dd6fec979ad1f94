"""Optimization passes, one per module, ordered by plan.py."""
