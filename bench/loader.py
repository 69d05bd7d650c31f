"""Training-loader throughput against what the debug trainer consumes, side by side in one run.

Data: synthetic prepared shards (random uint16 tokens; the loader does not look at values) with the debug
run's row length (seq_len 128 + 1), `--rows` rows over 8 MB files, written once to a temporary folder.
Measured, each in a fresh process (so page-cache warmth and thread pools are the same for every row):

  loader-1src-wN   `build_train_loader`, one source, local batch 16 (the debug run's 2,048 tokens per step),
                   N DataLoader worker processes; batches pulled for `--seconds` after 20 warm-up batches
  loader-3mix-wN   the same over a 3-source mixture (weights 5:3:2, one source capped at 1 epoch)
  trainer          the debug trainer (`train_configs/debug_model.toml`: bf16 autocast, batch 16 x 128) on the
                   built-in corpus: tokens/s over steps 2..`--steps` (first step excluded)

The ratio column divides each loader's tokens/s by the trainer's; the target is >= 100x. Tokens are
input positions (seq_len per row). Throughput is reported per process too: with N workers, N + 1 processes.

    python bench/loader.py                 # ~1 min on 2 cores
    python bench/loader.py --json bench/results/loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, BATCH = 128, 16

LOADER = """
import json, sys, time
import numpy as np
from raven_titan.data.loader import build_train_loader
from raven_titan.data.mixture import Mixture, Source
from raven_titan.data.shards import PackedRows
folder, sources, workers, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
BATCH = int(sys.argv[5])
splits = [PackedRows(f"{folder}/s{i}/train") for i in range(sources)]
weights, epochs = [5, 3, 2][:sources] if sources > 1 else [1], [None, 1.0, None]
mixture = Mixture([Source(f"s{i}", len(s), weights[i], epochs[i]) for i, s in enumerate(splits)], seed=0)
it = iter(build_train_loader(splits, mixture, BATCH, 0, 1, num_workers=workers))
for _ in range(20):
    next(it)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    inputs, labels = next(it)
    n += inputs.numel()
print(json.dumps([n / (time.perf_counter() - start)]))
"""

TRAINER = """
import json, sys, logging
from raven_titan.config.manager import parse_args
from raven_titan.train import Trainer
logging.disable(logging.INFO)
steps = int(sys.argv[2])
job = parse_args(["--job.dump_folder", sys.argv[1], "--training.steps", str(steps), "--validation.no-enable",
                  "--lr_scheduler.warmup_steps", "1", "--lr_scheduler.decay_steps", "0", "--metrics.log_freq", "1"])
Trainer(job).train()
records = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")][1:]
print(json.dumps([sum(r["tokens_per_second"] for r in records) / len(records)]))
"""


def run(code: str, *args, threads: int = 1) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])[0]


def make_data(folder: Path, rows: int) -> None:
    import numpy as np

    from raven_titan.data.shards import write_split

    rng = np.random.default_rng(0)
    per_file = 8 * 2**20 // (2 * (SEQ_LEN + 1))
    for i, n in enumerate([rows, rows // 2, rows // 4]):
        data = rng.integers(0, 4096, size=(n, SEQ_LEN + 1), dtype=np.uint16)
        write_split(folder / f"s{i}" / "train", data, vocab_size=4096, rows_per_file=per_file)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200_000, help="rows of the first source (~52 MB at 200k)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed window per loader configuration")
    p.add_argument("--steps", type=int, default=8, help="trainer steps (the first is excluded)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args()
    sys.path.insert(0, str(REPO))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_data(Path(tmp), a.rows)
        results["trainer"] = run(TRAINER, Path(tmp) / "run", a.steps, threads=2)
        for sources, name in [(1, "1src"), (3, "3mix")]:
            for workers in (0, 2):
                results[f"loader-{name}-w{workers}"] = run(LOADER, tmp, sources, workers, a.seconds, BATCH)
    trainer = results["trainer"]
    print(f"load average {os.getloadavg()[0]:.2f}; debug trainer {trainer:,.0f} tokens/s (2 threads)")
    print(f"{'configuration':<16} {'tokens/s':>14} {'per process':>14} {'x trainer':>10}")
    for key, tps in results.items():
        if key != "trainer":
            procs = 1 + int(key.rsplit("w", 1)[1])
            print(f"{key:<16} {tps:>14,.0f} {tps / procs:>14,.0f} {tps / trainer:>9,.0f}x")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
