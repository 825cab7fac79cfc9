"""List under ``preload:`` when running many transcription workers.

The supervisor then imports Deepgram's SDK and loads the TLS certificates once, before it forks
its workers, instead of every worker doing it for its first recording (some 1.5 s of CPU each).
"""

from phases.deepgram_api import warm

warm()
