"""Experiments that measure what dplis claims (accuracy, stability)."""
