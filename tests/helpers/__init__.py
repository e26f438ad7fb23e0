"""Shared builders and checkers for the tests."""
