"""Python client of kvcache, the distributed KV-cache for LLM inference.

The work happens in the native extension (Rust); this package re-exports it. Every blocking
call releases the GIL.
"""

from kvcache._native import (
    Client,
    KvcacheError,
    Registration,
    chain_keys,
    namespace_id,
)

__all__ = ["Client", "KvcacheError", "Registration", "chain_keys", "namespace_id"]
