"""The pipeline file.

Its model and bounds, reading it, following edits, editing it, and what is generated from it.
"""
