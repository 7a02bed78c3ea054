"""Tiny third-party-shaped models for the pass tests."""
