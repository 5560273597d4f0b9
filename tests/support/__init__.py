"""Helpers shared by the tests (not tests themselves, not fixtures: those live in conftest.py)."""
