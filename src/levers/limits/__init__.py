"""Limits shared by every worker on every host.

Their Lua scripts, the API phases call them through, and what `levers status` reads of them.
"""
