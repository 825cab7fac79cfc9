"""Limits shared by every worker on every host.

Their Lua scripts and the API phases call them through.
"""
