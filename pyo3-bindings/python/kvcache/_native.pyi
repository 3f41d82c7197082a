"""Type stubs for the native part of `kvcache`."""

from collections.abc import Sequence

from typing_extensions import Buffer

class KvcacheError(Exception):
    """A node refused a request, sent an invalid reply, or the client is closed."""

Segment = tuple[int, int]
"""`(address, length)` of caller memory, e.g. `(tensor.data_ptr() + offset, nbytes)`."""

class Client:
    """A client of one kvcache node. Blocking calls release the GIL.

    Raises ConnectionError if the node cannot be reached, TimeoutError if it does not answer
    within `timeout_s`, ValueError for bad arguments, KvcacheError otherwise.
    """

    def __init__(
        self,
        addr: str | Sequence[str],
        *,
        transport: str = "auto",
        timeout_s: float = 5.0,
        max_connections: int = 16,
        replicas: int = 1,
        token: str | None = None,
    ) -> None:
        """Connects to `addr` ("host:port"), or to a static cluster when given a list of
        members: keys are placed on a consistent-hash ring with `replicas` owners each, reads
        fall back to replicas, and a dead member costs misses (or nothing, with replicas >= 2),
        never an exception. Cluster members are connected lazily. `"etcd://host:port"` takes the
        members from etcd: the nodes started with `--etcd http://host:port`, re-read every 0.5 s,
        so a dead node leaves the ring when its lease expires and a new one joins it; if etcd
        goes away the last known members stay in use. Raises KvcacheError if etcd cannot be
        read at start. `stats()` reports `members`, `ring_version`, `replica_reads` and
        `failovers` for a cluster.

        `transport`: "auto" (default) uses shared memory when the node runs on this host and its
        socket admits us (gets copy straight from the node's pool into your buffers, every
        chunk checksummed as it lands), then RDMA when the module was built with the `rdma`
        feature and both ends have a device, else TCP, logging why on the `kvcache` logger;
        "shm" and "rdma" raise KvcacheError instead of falling back; "tcp" never does either.
        `stats()["transport"]` says which one a single-node client uses.

        `token`: a tenant's token for nodes started with `--auth` (default: the environment
        variable `KVCACHE_TOKEN`, if set). Each tenant has its own key space on the node. A
        missing, unknown or revoked token raises PermissionError."""

    def put(self, key: bytes, value: Buffer) -> bool:
        """Stores a block under a 16-byte key. True if stored (now or already); False if the
        node refused it (larger than its pool, or the pool is full of leased blocks)."""

    def get(self, key: bytes) -> bytes | None:
        """The block stored under `key`, or None."""

    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys are stored."""

    def prefix_match(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of a chain are stored."""

    def put_many(
        self, keys: Sequence[bytes], segments: Sequence[Sequence[Segment]], *, prefer: str | None = None
    ) -> list[bool]:
        """Stores blocks gathered from caller memory without copying through Python:
        `segments[i]` lists key i's pieces in order. The memory must stay valid and unchanged
        for the call. Returns, per key, whether it is stored. In a cluster, `prefer` ("host:port"
        of a member, e.g. the node next to the engine that will read the blocks) also keeps a
        copy of every block; the ring owners still hold them, so any client finds them."""

    def get_many_into(
        self, keys: Sequence[bytes], segments: Sequence[Sequence[Segment]], *, prefer: str | None = None
    ) -> list[bool]:
        """Fetches blocks straight into caller memory: `segments[i]` lists key i's
        destinations, filled in order (they must not overlap and must stay valid for the
        call). Returns, per key, True for a hit and False for a miss. Raises ValueError if a
        block's stored length differs from its segments' total (that destination is left
        untouched). A block that fails verification is a miss, never a hit with wrong bytes;
        over shared memory it may have been partly copied before the check failed, so a miss's
        destination holds unspecified bytes: recompute it. In a cluster, `prefer` is asked
        before the ring owners (see `put_many`)."""

    def register_gpu_memory(self, device: int, addr: int, length: int) -> str:
        """Registers `length` bytes of GPU memory at device address `addr` on CUDA device
        `device` (a KV tensor: `tensor.data_ptr()`, `tensor.nbytes`) for GPU-direct RDMA, once.
        The memory must stay allocated while the client lives. Returns how it was registered
        (`"dmabuf"` or peer memory). Raises KvcacheError saying why when it cannot be: the
        module was built without the `rdma` and `cuda` features, the client talks to a cluster
        or does not use RDMA, or the stack cannot register GPU memory; then stage through
        pinned host memory."""

    def get_many_into_gpu(self, keys: Sequence[bytes], segments: Sequence[Sequence[Segment]]) -> list[bool]:
        """Fetches blocks straight into GPU memory registered with `register_gpu_memory`:
        `segments[i]` lists key i's `(device address, length)` destinations. The node checks
        every block as it leases it. Returns, per key, True for a hit and False for a miss.
        Without an RDMA connection raises ValueError saying to stage."""

    def put_many_from_gpu(self, keys: Sequence[bytes], segments: Sequence[Sequence[Segment]]) -> list[bool]:
        """Stores blocks straight from GPU memory registered with `register_gpu_memory`.
        Returns, per key, whether it is stored. Without an RDMA connection raises ValueError
        saying to stage."""

    def stats(self) -> dict[str, int | float | str]:
        """This client's counters and what the node reports about itself."""

    def close(self) -> None:
        """Closes the client; later calls raise KvcacheError."""

    def __enter__(self) -> Client: ...
    def __exit__(self, *exc: object) -> None: ...

class Registration:
    """A record kept alive in etcd under a lease renewed every third of `ttl_s`: registered
    again if etcd forgets it, revoked by `close()` (or gone `ttl_s` after the process ends).
    The vLLM connector registers its engine this way for gateways to find."""

    def __init__(self, etcd: str, key: str, value: str, ttl_s: int = 10) -> None:
        """Starts keeping `value` under `key` in the etcd at `etcd`
        (`etcd://[user[:password]@]host:port`). Raises ValueError for a bad URL or TTL."""

    @property
    def key(self) -> str:
        """The record's key."""

    @property
    def registered(self) -> bool:
        """Whether the record is in etcd now (as of the last renewal)."""

    def close(self) -> None:
        """Revokes the lease (the record disappears at once) and stops renewing."""

def chain_keys(namespace: bytes, tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of every full block of `tokens` (16 bytes each), identical to the Rust core's.
    `namespace` is a 16-byte id from `namespace_id`."""

def namespace_id(
    model: str,
    kv_dtype: str,
    block_size: int,
    *,
    layout: str = "",
    tp_world_size: int = 1,
    tp_rank: int = 0,
    rank_agnostic: bool = False,
    lora: str | None = None,
    salt: str | None = None,
) -> bytes:
    """The 16-byte id of a namespace: everything that makes KV bytes differ for the same
    tokens (model, KV dtype, block size, layout, tensor-parallel rank, LoRA, salt)."""
