"""The training job of one sweep cell: ``python -m charllm.train --cell CELL.json --out DIR``.

Importing this package is cheap (no torch): the orchestrator imports ``OOM_EXIT_CODE``
from here to tell an out-of-memory cell (an expected outcome) from a failed one.
"""

from __future__ import annotations

#: Exit status of a job whose cell ran out of GPU memory (``result.json`` says ``oom``).
OOM_EXIT_CODE = 42
#: Exit status of a job that failed for any other reason (``result.json`` says ``failed``).
FAILED_EXIT_CODE = 1

__all__ = ["FAILED_EXIT_CODE", "OOM_EXIT_CODE"]
