"""Maintainers' scripts, run as python scripts/NAME.py.

A package only so that import-linter can check that they use the public API (harness.__all__) alone.
"""
