"""One worker process.

The RQ worker class, the job path (start, perform, settle), what a handler receives, and recovery.
"""
