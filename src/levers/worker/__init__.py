"""One worker process.

The RQ worker class, the job path (claim, run, complete), what a handler receives, and recovery.
"""
