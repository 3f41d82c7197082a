"""kvcache_vllm: a vLLM KV connector backed by kvcache nodes.

Load it in vLLM with ``"kv_connector": "KVCacheConnector", "kv_connector_module_path":
"kvcache_vllm"`` in ``--kv-transfer-config``; see the package README.
"""

from .connector import KVCacheConnector
from .layout import LAYOUTS, BlockLayout, LayoutError, LayoutSpec
from .metadata import KVCacheConnectorMetadata
from .settings import Settings

__all__ = [
    "LAYOUTS",
    "BlockLayout",
    "KVCacheConnector",
    "KVCacheConnectorMetadata",
    "LayoutError",
    "LayoutSpec",
    "Settings",
]
