"""Counts of the reliability suite (bad inputs tried and refused, faults injected, data lost), printed at
the end of the test run by tests/conftest.py."""

from collections import Counter

TALLY: Counter = Counter()
