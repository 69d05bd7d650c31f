"""Training-step benchmark on CPU: tokens/s and peak memory, fp32 vs bf16 autocast, for the debug and the
~150M shapes; and activation memory at depth 8 vs 64 with the backprop depth k fixed (O(k) check).

Every configuration runs in its own subprocess (so peak RSS is its own) through the real Trainer
(`Trainer.train_step` on the built-in corpus). Ratios are computed within one run; absolute numbers on a
2-core machine are noisy.

    python bench/train_step.py               # everything (~5-10 minutes on 2 cores)
    python bench/train_step.py --quick       # fewer steps, debug shape only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = {
    # shape: (flavor, seq_len, local batch, extra overrides)
    "debug": ("debug", 128, 16, []),
    "raven-150m": (
        "raven-150m",
        256,
        1,
        ["--model.mean_recurrence", "4", "--model.mean_backprop_depth", "2"],
    ),
}


def worker(argv: list[str], steps: int) -> dict:
    import torch

    from raven_titan.config.manager import parse_args
    from raven_titan.train import Trainer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    job = parse_args(argv + ["--validation.no-enable", "--job.dump_folder", "/tmp/raven_bench"])
    trainer = Trainer(job)
    trainer.train_step(trainer.next_micro_batches())  # warm-up (allocator, first-call costs)
    tokens, start = 0, time.perf_counter()
    for _ in range(steps):
        tokens += trainer.train_step(trainer.next_micro_batches())["tokens"]
    elapsed = time.perf_counter() - start
    return {
        "tokens_per_second": tokens / elapsed,
        "step_seconds": elapsed / steps,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def saved_activation_bytes(depth: int, k: int) -> dict:
    """Bytes autograd keeps for backward (exact, via saved-tensor hooks) and peak RSS for one fwd+bwd."""
    import torch

    from raven_titan.config.manager import parse_args
    from raven_titan.models import get_model_spec
    from raven_titan.parallel.parallelize import build_model

    job = parse_args(
        ["--training.seq_len", "512", "--model.mean_recurrence", "64", "--model.mean_backprop_depth", "8"]
    )
    spec = get_model_spec("raven")
    args = spec.resolve_args(job.model)
    model = build_model(spec, args, job, torch.device("cpu"))
    ids = torch.randint(0, args.vocab_size, (8, 512))
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes() if t.device.type != "meta" else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, num_steps=(depth - k, k), state_seeds=list(range(8)))
        loss = out.logits.float().logsumexp(-1).mean()
    loss.backward()
    return {
        "saved_bytes": sum(saved),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def run_sub(mode: str, payload: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, json.dumps(payload)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        mode, payload = a.worker[0], json.loads(a.worker[1])
        result = (
            worker(payload["argv"], payload["steps"]) if mode == "step" else saved_activation_bytes(**payload)
        )
        print(json.dumps(result))
        return

    steps = 2 if a.quick else a.steps
    shapes = ["debug"] if a.quick else list(SHAPES)
    print(f"training step, {steps} timed steps after one warm-up, per-iteration activation checkpointing")
    print(f"{'shape':<12} {'dtype':<9} {'tok/s':>9} {'s/step':>8} {'peak RSS GiB':>13}")
    for shape in shapes:
        flavor, seq, bsz, extra = SHAPES[shape]
        res = {}
        for dtype in ("float32", "bfloat16"):
            argv = ["--model.flavor", flavor, "--training.seq_len", str(seq), "--training.local_batch_size",
                    str(bsz), "--training.mixed_precision_param", dtype, *extra]  # fmt: skip
            res[dtype] = r = run_sub("step", {"argv": argv, "steps": steps})
            print(f"{shape:<12} {dtype:<9} {r['tokens_per_second']:9.1f} {r['step_seconds']:8.3f} "
                  f"{r['peak_rss_gib']:13.3f}")  # fmt: skip
        ratio = res["bfloat16"]["tokens_per_second"] / res["float32"]["tokens_per_second"]
        print(f"{shape:<12} bf16/fp32 throughput ratio {ratio:.2f}x")

    k = 4
    print(
        f"\nactivation memory, debug shape, seq 512, batch 8, bf16, k = {k} fixed, per-iteration checkpointing"
    )
    mem = {d: run_sub("act", {"depth": d, "k": k}) for d in (8, 64)}
    for d, r in mem.items():
        print(
            f"  depth {d:>2}: saved for backward {r['saved_bytes'] / 2**20:8.2f} MiB, peak RSS {r['peak_rss_gib']:.3f} GiB"
        )
    print(
        f"  ratio depth 64 / depth 8: saved {mem[64]['saved_bytes'] / mem[8]['saved_bytes']:.3f}x, "
        f"peak RSS {mem[64]['peak_rss_gib'] / mem[8]['peak_rss_gib']:.3f}x"
    )


if __name__ == "__main__":
    main()
