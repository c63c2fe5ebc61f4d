"""``python -m charllm.train --cell CELL.json --out DIR``."""

from __future__ import annotations

import os
import sys

from charllm.train.run import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code != 0:
        # After a failure other ranks may be blocked in collectives; a normal interpreter exit
        # can then hang in NCCL/gloo teardown. Leave at once so the launcher sees the status.
        os._exit(code)
    raise SystemExit(code)
