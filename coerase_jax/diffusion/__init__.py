"""Noise-schedule math and DDIM sampling (jitted, CFG, optional image tokens)."""
