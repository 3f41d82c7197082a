"""The autoscaler's end-to-end tests: the helpers of the gateway's and the server's tests are
importable from here (`gwstack`, `kvserver`, `vllm_serve`), and `scalerstack` runs the binary."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "gateway" / "tests" / "e2e"))
import gwstack  # noqa: E402, F401  (puts the server's and vLLM's helpers on the path)
