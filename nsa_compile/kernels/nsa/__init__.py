"""Native Sparse Attention: reference (`naive`), op registration (`op`), Triton launchers."""
