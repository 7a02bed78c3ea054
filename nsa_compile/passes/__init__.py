"""The pass: trace → detect → plan (Report) → rewrite."""
