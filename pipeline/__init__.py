"""The driver side of clipmaps: the job spec (``spec``), planning (``plan``: manifest, vocabulary, fingerprint and the
Ray Data pipeline), the CPU decode stage (``decode/``), sinks, resume and refusals (``resume``, ``fingerprint``),
``--dry-run`` checks (``dryrun``) and the driver loop (``run``).

Imports no torch at module level; the method registry it reads (``clipmaps.actors.registry``) is torch-free.
"""

# the public steps for the user's own Ray pipeline (``from clipmaps.pipeline import annotate``); the name is the
# function, not the module of the same name (``clipmaps.pipeline.annotate`` as a module stays importable by path)
from .annotate import annotate  # noqa: E402
from .write import WriteResult, unwritten, write_outputs  # noqa: E402

__all__ = ["WriteResult", "annotate", "unwritten", "write_outputs"]
