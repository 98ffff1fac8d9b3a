"""Evaluation: a synthetic multi-stem corpus with known ground truth, FAD and MIRDD (SPEC section 6)."""
