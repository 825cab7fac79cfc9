"""Limits shared by every worker on every host.

Their Lua scripts, the API phases call them through, and when a provider's answer means retry.
"""
