"""The supervisor.

Keeps each phase at its declared workers, forks and watches them, and holds its host's lease.
"""
