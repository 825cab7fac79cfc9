"""The Redis a pipeline runs on.

The embedded server, connections to it, riding out its outages, and opening a project.
"""
