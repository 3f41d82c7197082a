"""The command actuator's script in the end-to-end test, as a bare-metal user would write one:
`scale_engines.py STATE_DIR REPLICAS` starts or stops `vllm serve` instances so that REPLICAS run,
counting the one the test started itself (instance 0). Instances it starts register in etcd
through the kvcache connector (`advertise`), so the gateway and the autoscaler find them.
STATE_DIR/config.json says how to start one; STATE_DIR/N.pid names the running ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def running(pid: int) -> bool:
    """Alive and not a zombie (a stopped instance may wait unreaped: its parent was an earlier
    run of this script)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(state: Path, config: dict, n: int) -> None:
    port = config["ports"][n]
    kv = dict(config["kv"])
    kv["kv_connector_extra_config"] = {**kv["kv_connector_extra_config"], "advertise": f"http://127.0.0.1:{port}"}
    args = [
        config["vllm"], "serve", config["model"], "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", "tiny", "--max-model-len", "2048", "--enforce-eager", "--dtype", "bfloat16",
        "--enable-prefix-caching", "--seed", "0", "--kv-transfer-config", json.dumps(kv),
    ]  # fmt: skip
    env = {**os.environ, **config["env"], "VLLM_CPU_OMP_THREADS_BIND": str(n % (os.cpu_count() or 1))}
    log = (state / f"vllm-{n}.log").open("a")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (state / f"{n}.pid").write_text(str(proc.pid))
    print(f"started instance {n} (pid {proc.pid}, port {port})")


def stop(state: Path, n: int) -> None:
    pidfile = state / f"{n}.pid"
    pid = int(pidfile.read_text())
    if running(pid):
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if running(pid):
            os.killpg(pid, signal.SIGKILL)
    pidfile.unlink()
    print(f"stopped instance {n} (pid {pid})")


def main() -> None:
    state, replicas = Path(sys.argv[1]), int(sys.argv[2])
    config = json.loads((state / "config.json").read_text())
    if not 1 <= replicas <= len(config["ports"]):
        sys.exit(f"replicas must be between 1 and {len(config['ports'])}, got {replicas}")
    for n in range(1, len(config["ports"])):
        pidfile = state / f"{n}.pid"
        alive = pidfile.exists() and running(int(pidfile.read_text()))
        if n < replicas and not alive:
            start(state, config, n)
        elif n >= replicas and pidfile.exists():
            stop(state, n)


if __name__ == "__main__":
    main()
