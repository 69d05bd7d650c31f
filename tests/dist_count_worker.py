"""torchrun worker for test_distributed: counts the collectives of one FSDP training step per depth (n, k)
and prints them as JSON on rank 0. Not a test module itself."""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch.distributed as dist

from raven_titan.config.manager import parse_args
from raven_titan.parallel.distributed import teardown
from raven_titan.train import Trainer

COLLECTIVES = (
    "all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
    "broadcast", "all_gather",
)  # fmt: skip


def main() -> None:
    trainer = Trainer(parse_args(sys.argv[1:]))
    batches = trainer.next_micro_batches()
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)

        return wrapper

    result = {}
    for n, k in [(1, 1), (12, 4), (30, 2)]:
        calls.clear()
        for name in originals:
            setattr(dist, name, counting(name))
        trainer.forward_backward(batches, n, k)
        for name, fn in originals.items():
            setattr(dist, name, fn)
        trainer.optimizer.zero_grad(set_to_none=True)
        result[f"{n}+{k}"] = {**calls, "total": sum(calls.values())}
    if dist.get_rank() == 0:
        print(json.dumps(result))
    state = {"trainer": trainer}
    del trainer
    teardown(state)


if __name__ == "__main__":
    main()
