"""Documents.

Submitting them, routing them to phases, their records in Redis and their bytes in the artifact
store.
"""
