"""`python with_faults.py MODULE ARGS...`: run a Space's own entrypoint (`python -m MODULE ARGS...`) with the
test-only `faulty://` bucket backend registered, so a test can inject bucket faults into a running service through
the file named by DWS_FAULTS_FILE (see faulty_bucket.py). Nothing else differs from the production command."""

from __future__ import annotations

import runpy
import sys

import faulty_bucket  # noqa: F401 -- registers faulty://

if __name__ == "__main__":
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
