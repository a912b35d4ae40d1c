"""Modules the tests share: servers and engines they start, what they read back, certificates."""
