"""Engram hashed n-gram lookup: reference (`naive`), op registration (`op`), Triton launcher
(`triton_lookup`)."""
