"""torch.compile on CPU: step time of the real training step (`Trainer.train_step`, built-in corpus, debug
shape, bf16 autocast, per-iteration activation checkpointing), eager vs `--compile.enable` (each block
compiled once; the recurrence loop stays in Python).

Both trainers live in one subprocess (compile is applied per block, so the eager model stays eager) and
their timed steps alternate (eager, compiled, compiled, eager, ...): on a shared, noisy machine each pair of
steps sees about the same load, and the median of the per-pair ratios is the headline number. Warm-up, timed
separately (the compile time is the compiled warm-up minus the eager one; a cold compile: inductor's on-disk
caches are off unless --warm-cache): one `forward_backward` at depth
(1, 1) (compiles the no-grad and the grad forward and the backward of each block, as tests/test_compile.py
does) and one full training step. Both trainers start from the same seed, so they run the same sampled
depths (step i of one is step i of the other).

    python bench/compile.py                 # debug shape, batch 16 x 128 tokens, 6 timed step pairs (~1-3 min)
    python bench/compile.py --threads 1     # on a loaded machine: 2 OpenMP threads on 2 busy cores stall badly
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(argv: list[str], steps: int, threads: int) -> dict:
    import torch

    from raven_titan.config.manager import parse_args
    from raven_titan.train import Trainer

    torch.set_num_threads(threads)
    res = {}
    trainers = {}
    for mode, extra in (("eager", []), ("compiled", ["--compile.enable"])):
        trainer = trainers[mode] = Trainer(
            parse_args(argv + extra + ["--job.dump_folder", f"/tmp/raven_bench_compile_{mode}"])
        )
        start = time.perf_counter()
        trainer.forward_backward(trainer.next_micro_batches(), 1, 1)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.train_step(trainer.next_micro_batches())
        res[mode] = {"warmup_seconds": time.perf_counter() - start, "step_seconds": [], "depths": []}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for i in range(steps):
        for mode in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            t0 = time.perf_counter()
            out = trainers[mode].train_step(trainers[mode].next_micro_batches())
            res[mode]["step_seconds"].append(time.perf_counter() - t0)
            res[mode]["depths"].append((out["n"], out["k"]))
            res[mode]["tokens_per_step"] = out["tokens"]
    res["graphs_after_warmup"] = graphs
    res["graphs_at_end"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return res


def run_sub(payload: dict, timeout: float, warm_cache: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(payload)]
    env = {**os.environ, "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "PYTHONPATH": str(REPO)}
    if not warm_cache:  # a cold compile: no reuse of earlier runs' kernels from the on-disk inductor caches
        env["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=REPO, timeout=timeout)
    if out.returncode:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each mode after the warm-up")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the worker")
    ap.add_argument("--warm-cache", action="store_true", help="let inductor reuse its on-disk caches")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        p = json.loads(a.worker)
        print(json.dumps(worker(p["argv"], p["steps"], p["threads"])))
        return

    argv = [
        "--model.flavor", "debug", "--training.seq_len", str(a.seq_len), "--training.local_batch_size",
        str(a.batch), "--training.device", "cpu", "--validation.no-enable",
    ]  # fmt: skip
    print(f"debug shape, batch {a.batch} x {a.seq_len} tokens, bf16 autocast, per-iteration AC, CPU, "
          f"{a.threads} threads; warm-up = forward_backward(1, 1) + 1 step, then {a.steps} alternating step pairs")  # fmt: skip
    load_before = os.getloadavg()
    res = run_sub({"argv": argv, "steps": a.steps, "threads": a.threads}, a.timeout, a.warm_cache)
    e, c = res["eager"], res["compiled"]

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    print(f"{'mode':<9} {'warm-up s':>9} {'median s/step':>13} {'mean s/step':>11} {'tok/s':>8}")
    for mode, r in (("eager", e), ("compiled", c)):
        r["median"], r["mean"] = median(r["step_seconds"]), sum(r["step_seconds"]) / len(r["step_seconds"])
        print(f"{mode:<9} {r['warmup_seconds']:9.1f} {r['median']:13.3f} {r['mean']:11.3f} "
              f"{r['tokens_per_step'] / r['median']:8.0f}")  # fmt: skip
    pairs = [ce / ee for ce, ee in zip(c["step_seconds"], e["step_seconds"])]
    print(f"compiled / eager step time: median of {len(pairs)} paired ratios {median(pairs):.2f}x "
          f"(range {min(pairs):.2f}-{max(pairs):.2f}); ratio of medians {c['median'] / e['median']:.2f}x; "
          f"speed-up {1 / median(pairs):.2f}x")  # fmt: skip
    print(
        f"compile overhead ({'warm' if a.warm_cache else 'cold'} inductor cache) ~ {c['warmup_seconds'] - e['warmup_seconds']:.1f} s "
        f"(compiled warm-up {c['warmup_seconds']:.1f} s - eager warm-up {e['warmup_seconds']:.1f} s); "
        f"dynamo graphs {res['graphs_after_warmup']} after warm-up, {res['graphs_at_end']} at the end"
    )
    print(f"load average (1 min) before / after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs (other work on the cores makes every number noisy)")  # fmt: skip
    print(f"same depths in both modes: {e['depths'] == c['depths']}; (n, k) = {e['depths']}")


if __name__ == "__main__":
    main()
