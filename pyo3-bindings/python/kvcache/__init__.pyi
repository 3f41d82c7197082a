from kvcache._native import Client as Client
from kvcache._native import KvcacheError as KvcacheError
from kvcache._native import Registration as Registration
from kvcache._native import chain_keys as chain_keys
from kvcache._native import namespace_id as namespace_id

__all__ = ["Client", "KvcacheError", "Registration", "chain_keys", "namespace_id"]
