"""Objectives: what the merge coefficients are optimized for, one small module each."""
