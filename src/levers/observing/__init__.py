"""Where the pipeline stands.

Status, supervisor reports, advice, Prometheus metrics, and lever changes taking effect.
"""
