"""Training throughput on the Huginn shape on one GPU: bf16 vs float8 (torchao tensorwise), eager vs compiled.

Shape: `nebel-raven-3.5b` (train_configs/nebel_raven_3.5b.toml: ELLISAdam, bf16 autocast with fp32 master
weights), seq 4096, micro-batch 1, per-iteration activation checkpointing, depth fixed at (n, k) = (24, 8)
(24 no-grad + 8 gradient core iterations: the mode of Huginn's depth distribution with its backprop depth).
One step is the real `Trainer.train_step` (its `forward_backward` with the loss as in training, gradient
clipping, optimizer step, float8 scale hook, LR schedule) on a model from the registry + `build_model`
(float8 -> AC -> compile -> init) and `build_optimizer`; only the data differs: random token ids
(`torch.randint`, vocab 65536) instead of the data pipeline, and the depth sampler returns (24, 8).

Reported per configuration (each in its own subprocess, with a time budget): tokens/s, TFLOP/s and MFU from
`flops_per_token(args, 4096, 24, 8, "per-iteration")` (the project's convention: recomputed FLOPs of the
checkpointed iterations count, as in the trainer's logged MFU) and MFU without the recomputation
(`ac_mode="none"`: model FLOPs only), peak memory (`torch.cuda.max_memory_allocated`), warm-up/compile time.
MFU is against `raven_titan.metrics.peak_flops(device, bfloat16)` (H200: 989e12 dense bf16) for every
configuration, float8 included: float8 MFU is reported against the bf16 peak (the fp8 dense peak is 2x).

    python bench/gpu_throughput.py                    # one GPU, ~5-6 minutes (4 configurations)
    python bench/gpu_throughput.py --tiny             # tiny shape (E 64, 2 heads, seq 64, (n, k) = (2, 1)), CPU ok
    python bench/gpu_throughput.py --configs bf16-compile,fp8-compile --steps 8

Results: a table on stdout and JSON in $OUT/gpu_throughput[_tiny].json when OUT is set, else in
bench/results/. bench/gpu_check.sh runs this after the CUDA-visible tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {  # name: (float8, compile)
    "bf16-eager": (False, False),
    "bf16-compile": (False, True),
    "fp8-compile": (True, True),
    "fp8-eager": (True, False),
}
FULL = {
    "argv": ["--job.config_file", "train_configs/nebel_raven_3.5b.toml", "--training.seq_len", "4096"],
    "depth": (24, 8),
    "budget": {False: 70.0, True: 150.0},  # seconds per configuration: eager, compiled
}
TINY = {
    "argv": [
        "--model.flavor",
        "debug",
        "--model.n_embd",
        "64",
        "--model.n_heads",
        "2",
        "--model.intermediate_size",
        "128",
        "--model.mean_recurrence",
        "2",
        "--model.mean_backprop_depth",
        "1",
        "--training.seq_len",
        "64",
    ],  # fmt: skip
    "depth": (2, 1),
    "budget": {False: 60.0, True: 150.0},
}


# ---- one configuration (subprocess) ---------------------------------------------------------------------


def make_bench_trainer(argv: list[str], depth: tuple[int, int]):
    """A `Trainer` whose model, optimizer and schedule come from the real builders, without the data
    pipeline (its batches are given), and whose depth sampler always returns `depth`."""
    import torch

    from raven_titan.checkpoint import TrainState
    from raven_titan.config.manager import parse_args
    from raven_titan.models import get_model_spec
    from raven_titan.optim import build_lr_scheduler, build_optimizer
    from raven_titan.parallel.parallelize import build_model
    from raven_titan.train import Trainer, pick_device

    class BenchTrainer(Trainer):
        def __init__(self, job) -> None:  # noqa: D401 - the data-free part of Trainer.__init__
            t = job.training
            self.job = job
            self.rank, self.dp_rank, self.dp_size = 0, 0, 1
            self.device = pick_device(t.device)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", torch.cuda.current_device())
            self.dtype = torch.bfloat16 if t.mixed_precision_param == "bfloat16" else torch.float32
            spec = get_model_spec(job.model.name)
            self.spec = dataclasses.replace(spec, sample_depth=lambda args, seed, step: depth)
            self.args = self.spec.resolve_args(job.model)
            self.global_batch, self.accum = t.local_batch_size, 1
            torch.manual_seed(t.seed)
            self.mesh = None
            self.model, self.reducer = build_model(self.spec, self.args, job, self.device, None)
            self.optimizer = build_optimizer(self.model, job.optimizer)
            self.scheduler = build_lr_scheduler(self.optimizer, job.lr_scheduler, t.steps)
            self.state = TrainState()

    job = parse_args(
        argv
        + ["--training.local_batch_size", "1", "--training.global_batch_size", "1", "--validation.no-enable",
           "--checkpoint.no-enable", "--activation_checkpoint.mode", "per-iteration",
           "--job.dump_folder", "/tmp/raven_bench_gpu"]
    )  # fmt: skip
    return BenchTrainer(job)


def worker(p: dict) -> None:
    """Build, warm up, time steps until `steps` or the budget; rewrite `p["result"]` after every phase so a
    run killed at its hard limit still leaves what it measured."""
    t_start = time.perf_counter()
    result: dict = {"config": p["config"], "status": "starting"}
    out_path = Path(p["result"])

    def save(**kw) -> None:
        result.update(kw)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out_path)

    import torch

    from raven_titan.metrics import peak_flops, peak_memory_gib, reset_peak_memory

    float8, compile_ = CONFIGS[p["config"]]
    argv = list(p["argv"])
    argv += ["--compile.enable"] if compile_ else ["--compile.no-enable"]
    argv += ["--float8.enable", "--float8.recipe", "tensorwise"] if float8 else ["--float8.no-enable"]
    if p.get("device"):
        argv += ["--training.device", p["device"]]
    n, k = p["depth"]
    save(status="building", argv=argv)
    t0 = time.perf_counter()
    trainer = make_bench_trainer(argv, (n, k))
    dev = trainer.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    sync()
    seq = trainer.job.training.seq_len
    fpt = trainer.spec.flops_per_token(trainer.args, seq, n, k, "per-iteration")
    fpt_model = trainer.spec.flops_per_token(trainer.args, seq, n, k, "none")
    peak = peak_flops(dev, torch.bfloat16)
    n_params = trainer.spec.num_params(trainer.args)["total"]
    save(
        status="built", build_seconds=time.perf_counter() - t0, device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        parameters=n_params, seq_len=seq, depth=[n, k], flops_per_token=fpt, model_flops_per_token=fpt_model,
        peak_flops_bf16=peak, float8=float8, compile=compile_,
        optimizer=trainer.job.optimizer.name, autocast=trainer.job.training.mixed_precision_param,
    )  # fmt: skip

    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, trainer.args.vocab_size, (1, seq + 1), generator=gen) for _ in range(2)]
    batches = [[(r[:, :-1].to(dev), r[:, 1:].to(dev))] for r in rows]
    reset_peak_memory(dev)

    t0 = time.perf_counter()
    losses = []
    for i in range(p["warmup"]):
        losses.append(trainer.train_step(batches[i % 2])["loss"])
        sync()
    save(status="warm", warmup_seconds=time.perf_counter() - t0, warmup_losses=losses)

    times, tokens = [], None
    budget = p["budget"]
    while len(times) < p["steps"]:
        elapsed = time.perf_counter() - t_start
        if times and elapsed + max(times) * 1.2 > budget:
            break
        t0 = time.perf_counter()
        out = trainer.train_step(batches[len(times) % 2])
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(out["loss"])
        tokens = out["tokens"]
        ordered = sorted(times)
        median = ordered[len(ordered) // 2]
        mem, kind = peak_memory_gib(dev)
        save(
            status="ok", step_seconds=times, median_step_seconds=median, tokens_per_step=tokens,
            tokens_per_second=tokens / median, tflops=fpt * tokens / median / 1e12,
            mfu=None if peak is None else fpt * tokens / median / peak,
            mfu_model_flops=None if peak is None else fpt_model * tokens / median / peak,
            peak_memory_gib=mem, memory_kind=kind,
            peak_reserved_gib=torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else None,
            losses=losses, total_seconds=time.perf_counter() - t_start,
        )  # fmt: skip


# ---- driver ----------------------------------------------------------------------------------------------


def run_config(name: str, shape: dict, a, folder: Path, hard_limit: float) -> dict:
    result_path = folder / f"{name}.json"
    budget = min(shape["budget"][CONFIGS[name][1]] if a.budget is None else a.budget, hard_limit - 15)
    payload = {
        "config": name, "argv": shape["argv"], "depth": shape["depth"], "steps": a.steps,
        "warmup": a.warmup, "budget": budget, "result": str(result_path), "device": a.device,
    }  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
    }
    cmd = [sys.executable, __file__, "--worker", json.dumps(payload)]
    log = folder / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                  timeout=hard_limit, check=False)  # fmt: skip
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    res = json.loads(result_path.read_text()) if result_path.exists() else {"config": name}
    res["returncode"], res["wall_seconds"] = rc, time.perf_counter() - start
    if rc != 0:
        tail = log.read_text()[-2500:]
        res["error_tail"] = tail
        res["status"] = f"{res.get('status', 'not started')} (exit {rc})"
        print(f"--- {name}: exit {rc}; last output:\n{tail}\n---", flush=True)
    return res


def fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape (proves the script on CPU)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {list(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per configuration (at most)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps (the first one compiles)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per configuration (default by mode)")
    ap.add_argument("--deadline", type=float, default=None, help="seconds for all configurations together")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="training.device")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(json.loads(a.worker))
        return

    os.environ.setdefault(
        "TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1"
    )  # its .so files need the torch it was built for
    import torch

    if not a.tiny and not torch.cuda.is_available() and a.device != "cpu":
        raise SystemExit("no CUDA device visible: the 3.5B shape needs a GPU (use --tiny to check on CPU)")
    shape = TINY if a.tiny else FULL
    names = [c for c in a.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    suffix = "_tiny" if a.tiny else ""
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="raven_gpu_throughput_"))  # per-configuration files ($OUT takes 8)
    n, k = shape["depth"]
    print(f"{'tiny shape' if a.tiny else 'nebel-raven-3.5b'}, depth (n, k) = ({n}, {k}), micro-batch 1, "
          f"per-iteration AC; configurations {names}; up to {a.steps} timed steps after {a.warmup} warm-up",
          flush=True)  # fmt: skip
    start = time.perf_counter()
    results = {}
    for name in names:
        default_budget = shape["budget"][CONFIGS[name][1]] if a.budget is None else a.budget
        hard = default_budget + 60
        if a.deadline is not None:
            left = a.deadline - (time.perf_counter() - start)
            if left < 45:
                results[name] = {"config": name, "status": f"skipped: {left:.0f} s left of the deadline"}
                print(f"{name}: skipped ({left:.0f} s left of the deadline)", flush=True)
                continue
            hard = min(hard, left)
        print(f"{name}: running (hard limit {hard:.0f} s) ...", flush=True)
        results[name] = r = run_config(name, shape, a, work, hard)
        print(f"{name}: {r.get('status')} in {r['wall_seconds']:.0f} s: "
              f"{fmt(r.get('tokens_per_second'), '.0f')} tok/s", flush=True)  # fmt: skip

    any_r = next((r for r in results.values() if r.get("device")), {})
    peak = any_r.get("peak_flops_bf16")
    print()
    print(f"device {any_r.get('device_name', '?')} ({any_r.get('device', '?')}); torch {torch.__version__}; "
          f"MFU against the dense bf16 peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s for every row "
          "(float8 rows too; the fp8 dense peak is 2x)")  # fmt: skip
    if any_r:
        print(
            f"{any_r['parameters']:,} parameters; FLOPs/token at (n, k) = ({n}, {k}): "
            f"{any_r['flops_per_token']:.4g} with AC recompute, {any_r['model_flops_per_token']:.4g} without"
        )
    hdr = (f"{'config':<13} {'status':<8} {'steps':>5} {'s/step':>7} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>6} "
           f"{'MFU(mdl)':>8} {'peak GiB':>8} {'warm-up s':>9} {'loss':>7}")  # fmt: skip
    print(hdr)
    for name, r in results.items():
        ok = r.get("tokens_per_second") is not None
        status = "ok" if ok and r.get("returncode") == 0 else ("partial" if ok else "failed")
        if str(r.get("status", "")).startswith("skipped"):
            status = "skipped"
        losses = r.get("losses") or [None]
        print(f"{name:<13} {status:<8} {len(r.get('step_seconds', [])):>5} "
              f"{fmt(r.get('median_step_seconds'), '7.3f', '    n/a')} {fmt(r.get('tokens_per_second'), '8.1f', '     n/a')} "
              f"{fmt(r.get('tflops'), '8.2f', '     n/a')} {fmt(r.get('mfu'), '6.1%', '   n/a')} "
              f"{fmt(r.get('mfu_model_flops'), '8.1%', '     n/a')} {fmt(r.get('peak_memory_gib'), '8.2f', '     n/a')} "
              f"{fmt(r.get('warmup_seconds'), '9.1f', '      n/a')} {fmt(losses[-1], '7.3f', '    n/a')}")  # fmt: skip
    ratios = {}
    for mode in ("compile", "eager"):
        f8, bf = results.get(f"fp8-{mode}", {}), results.get(f"bf16-{mode}", {})
        if f8.get("tokens_per_second") and bf.get("tokens_per_second"):
            ratios[f"fp8/bf16 {mode}"] = f8["tokens_per_second"] / bf["tokens_per_second"]
    for prec in ("bf16", "fp8"):
        c, e = results.get(f"{prec}-compile", {}), results.get(f"{prec}-eager", {})
        if c.get("tokens_per_second") and e.get("tokens_per_second"):
            ratios[f"compile/eager {prec}"] = c["tokens_per_second"] / e["tokens_per_second"]
    print("throughput ratios: " + (", ".join(f"{k_} {v:.2f}x" for k_, v in ratios.items()) or "n/a"))
    if peak is None:
        print("(MFU n/a: no peak FLOPs known for this device, e.g. on CPU)")

    summary = {
        "shape": "tiny" if a.tiny else "nebel-raven-3.5b", "depth": [n, k], "torch": torch.__version__,
        "python": platform.python_version(), "ratios": ratios, "results": results,
        "total_seconds": time.perf_counter() - start,
    }  # fmt: skip
    try:
        import torchao

        summary["torchao"] = getattr(torchao, "__version__", "?")
    except ImportError:
        summary["torchao"] = None
    path = out_dir / f"gpu_throughput{suffix}.json"
    path.write_text(json.dumps(summary, indent=1))
    with open(out_dir / f"gpu_throughput{suffix}_workers.log", "w") as fh:
        for name in results:
            log = work / f"{name}.log"
            fh.write(f"===== {name} =====\n{log.read_text() if log.exists() else '(no log)'}\n")
    print(f"results: {path} (worker logs beside it)")


if __name__ == "__main__":
    main()
