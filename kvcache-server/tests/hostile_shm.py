"""A hostile shared-memory client: attaches to a node's Unix socket and tries every way it
knows to write the pool through the descriptors it is handed. Prints one JSON object: for
each descriptor (pool, staging) and each attempt, "allowed" or the errno's name.

Run by shm_end_to_end.rs, as root and as an unprivileged uid: python3 -c SCRIPT SOCKET
"""

import ctypes
import errno
import json
import os
import socket
import struct
import sys

PROT_READ, PROT_WRITE, MAP_SHARED = 1, 2, 1
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
MAP_FAILED = ctypes.c_void_p(-1).value

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def failed() -> str:
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def attach(path: str) -> tuple[list[int], int, int]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    control = b"\x08" + varint(1 << 20)  # ShmAttachRequest { staging_bytes: 1 MiB }
    s.sendall(b"KV" + bytes([1, 6]) + struct.pack("<III", 1, len(control), 0) + control)
    head, anc, _, _ = s.recvmsg(16, socket.CMSG_SPACE(2 * 4))
    while len(head) < 16:
        head += s.recv(16 - len(head))
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += list(struct.unpack(f"{len(data) // 4}i", data[: len(data) // 4 * 4]))
    (control_len,) = struct.unpack("<I", head[8:12])
    body = b""
    while len(body) < control_len:
        body += s.recv(control_len - len(body))
    if head[3] != 0x80 | 6 or len(fds) != 2:
        sys.exit(f"attach failed: op {head[3]:#x}, {len(fds)} descriptors")
    # ShmAttachReply: field 1 pool_bytes, field 2 staging_bytes (varints, in order).
    sizes, i = [], 0
    while i < len(body) and len(sizes) < 2:
        i += 1  # tag
        n, shift = 0, 0
        while True:
            b = body[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        sizes.append(n)
    # Keep the socket open for the whole attack: closing it ends the session.
    attach.sock = s  # type: ignore[attr-defined]
    return fds, sizes[0], sizes[1]


def attacks(fd: int, size: int) -> dict[str, str]:
    out: dict[str, str] = {}
    span = min(size, 1 << 20)
    try:
        os.pwrite(fd, b"\xff" * span, 0)
        out["write"] = "allowed"
    except OSError as e:
        out["write"] = errno.errorcode[e.errno]
    addr = libc.mmap(None, span, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if addr in (None, MAP_FAILED):
        out["mmap_write"] = failed()
    else:
        ctypes.memset(addr, 0xFF, span)
        libc.munmap(addr, span)
        out["mmap_write"] = "allowed"
    addr = libc.mmap(None, span, PROT_READ, MAP_SHARED, fd, 0)
    if addr in (None, MAP_FAILED):
        out["mprotect"] = "no read mapping: " + failed()
    else:
        if libc.mprotect(addr, span, PROT_READ | PROT_WRITE) == 0:
            ctypes.memset(addr, 0xFF, span)
            out["mprotect"] = "allowed"
        else:
            out["mprotect"] = failed()
        libc.munmap(addr, span)
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, mode, 0, size) == 0:
        out["punch_hole"] = "allowed"
    else:
        out["punch_hole"] = failed()
    try:
        os.ftruncate(fd, 0)
        out["truncate"] = "allowed"
    except OSError as e:
        out["truncate"] = errno.errorcode[e.errno]
    return out


def main() -> None:
    fds, pool_bytes, staging_bytes = attach(sys.argv[1])
    report: dict[str, object] = {"uid": os.getuid()}
    for name, fd, size in (("pool", fds[0], pool_bytes), ("staging", fds[1], staging_bytes)):
        report[name] = attacks(fd, size)
        try:
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        except OSError as e:
            report[name + "_reopened"] = {"open": errno.errorcode[e.errno]}
        else:
            report[name + "_reopened"] = {"open": "allowed", **attacks(rw, size)}
            os.close(rw)
    print(json.dumps(report))


main()
