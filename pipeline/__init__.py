"""The driver side of clipmaps (job spec, sources, CPU decode, plan building, sinks, resume).

Imports no torch at module level. Not written yet: the pipeline issue builds it on top of ``clipmaps.actors``.
"""
