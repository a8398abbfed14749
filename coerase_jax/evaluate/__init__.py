"""Evaluation: how much of the concept is left (efficacy) and what else changed (usability)."""
