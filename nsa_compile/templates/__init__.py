"""Parametrised Triton kernel templates and their autotune config spaces."""
