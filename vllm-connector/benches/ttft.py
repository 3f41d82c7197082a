"""Time to first token of a fresh vLLM instance on prompts another instance served before.

    python vllm-connector/benches/ttft.py [--prompts 2] [--prompt-tokens 1500] [--repeats 3]

Runs in the vLLM venv (scripts/setup-vllm.sh). The model is DESIGN.md's calibration shape
(a random Llama: hidden 1024, 16 layers, 8 KV heads, head size 128, bf16; 64 KiB of KV per
token, a 128-token block is 512 KiB per layer). Every engine runs with one OpenMP thread bound
to core 0 (VLLM_CPU_OMP_THREADS_BIND=0) in every mode; the cache node (a release build) and
connector I/O threads get the other core.

Modes, each a fresh single-process engine per repeat, interleaved across repeats:
- `recompute`: no connector; the prompt is computed (the baseline);
- `local hit`: no connector; the same prompt a second time in the same engine, served by vLLM's
  own prefix cache (the ceiling: no transfer at all);
- `ExampleConnector /dev/shm`: vLLM's in-tree reference connector, its safetensors files on
  /dev/shm (the peer);
- `kvcache shm` and `kvcache tcp`: this connector over each transport.
The connector modes load what a `populate` instance saved before the repeats. Each prompt is
generated alone with max_tokens=1 after a warm-up prompt; a timing is that generate call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "pyo3-bindings" / "tests"))
sys.path.insert(0, str(REPO / "vllm-connector" / "tests"))

from conftest import kv_config, make_prompts, models_dir, run_engine  # noqa: E402
from kvserver import start_server, stop_server  # noqa: E402

MODEL_NOTE = "random Llama: hidden 1024, 16 layers, 8 KV heads, head size 128, bf16, block 128"


def example_connector(path: str) -> dict:
    return {
        "kv_connector": "ExampleConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"shared_storage_path": path},
    }


class Runner:
    """Fresh engines on the benchmark's prompts, one OpenMP thread bound to core 0."""

    def __init__(self, model: Path, prompts: list[list[int]], warmup: list[list[int]], tmp: Path):
        self.model, self.prompts, self.warmup, self.tmp = model, prompts, warmup, tmp

    def run(self, kv: dict | None, rounds: int = 1) -> list[dict]:
        """One fresh engine; the timings of its last round, one per prompt."""
        return run_engine(
            self.tmp,
            self.model,
            self.prompts,
            kv,
            env={"VLLM_CPU_OMP_THREADS_BIND": "0"},
            max_tokens=1,
            one_by_one=True,
            warmup=self.warmup,
            rounds=rounds,
            max_model_len=4096,
        )


def release_server() -> Path:
    """The release kvcache-server, built if stale: the benchmark measures the real thing."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    subprocess.run(["cargo", "build", "--release", "--locked", "-q", "-p", "kvcache-server"], cwd=REPO, check=True)
    return target / "release" / "kvcache-server"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benches" / "results" / "ttft.json")
    args = parser.parse_args()

    model = models_dir() / "bench-16l"
    if not (model / "config.json").is_file():
        sys.exit(f"no benchmark model at {model}: run scripts/setup-vllm.sh")
    prompts = make_prompts([args.prompt_tokens] * args.prompts, seed=11)
    warmup = make_prompts([300], seed=13)

    os.environ["KVCACHE_SERVER_BIN"] = str(release_server())
    server = start_server("--memory", "2GiB")
    shm_dir = tempfile.mkdtemp(prefix="kvcache-ttft-example-", dir="/dev/shm")
    modes = {
        "recompute": (None, 1),
        "local hit": (None, 2),
        "ExampleConnector /dev/shm": (example_connector(shm_dir), 1),
        "kvcache shm": (kv_config(server, transport="shm"), 1),
        "kvcache tcp": (kv_config(server, transport="tcp"), 1),
    }
    samples: dict[str, list[dict]] = {name: [] for name in modes}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runner = Runner(model, prompts, warmup, Path(tmp))
            populate = {
                "ExampleConnector": runner.run(example_connector(shm_dir)),
                "kvcache": runner.run(kv_config(server)),
            }
            for repeat in range(args.repeats):
                for name, (kv, rounds) in modes.items():
                    samples[name] += runner.run(kv, rounds)
                    print(f"repeat {repeat + 1}/{args.repeats} {name}: done", flush=True)
    finally:
        stop_server(server)
        shutil.rmtree(shm_dir, ignore_errors=True)

    baseline = statistics.median(o["seconds"] for o in samples["recompute"])
    ceiling = statistics.median(o["seconds"] for o in samples["local hit"])
    print(
        f"\n{args.prompts} prompts x {args.prompt_tokens} tokens, {args.repeats} fresh engines per mode; {MODEL_NOTE}"
    )
    print(f"{'mode':<26} {'median TTFT':>12} {'cached tokens':>14} {'speedup':>8} {'vs local hit':>13}")
    summary = {}
    for name, outs in samples.items():
        median = statistics.median(o["seconds"] for o in outs)
        cached = statistics.median(o["num_cached_tokens"] for o in outs)
        summary[name] = {
            "median_ttft_s": round(median, 4),
            "median_cached_tokens": cached,
            "speedup_vs_recompute": round(baseline / median, 2),
            "ttft_vs_local_hit": round(median / ceiling, 2),
            "samples_s": [round(o["seconds"], 4) for o in outs],
        }
        print(
            f"{name:<26} {median * 1000:>10.1f}ms {cached:>14.0f} {baseline / median:>7.2f}x {median / ceiling:>12.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": "python vllm-connector/benches/ttft.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "model": MODEL_NOTE,
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "summary": summary,
        "populate_s": {k: [round(o["seconds"], 4) for o in v] for k, v in populate.items()},
    }
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
