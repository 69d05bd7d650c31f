"""torch.compile per block: random recurrence depths never recompile."""

from __future__ import annotations

import pytest
import torch

from raven_titan.config.manager import parse_args
from raven_titan.train import Trainer

TINY = [
    "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
    "--model.mean_recurrence", "8", "--model.mean_backprop_depth", "3",
    "--training.seq_len", "32", "--training.local_batch_size", "2", "--training.steps", "21",
    "--lr_scheduler.warmup_steps", "1", "--validation.no-enable", "--compile.enable",
]  # fmt: skip


@pytest.fixture
def dynamo_reset():
    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def test_twenty_random_depth_steps_cause_no_recompile(tmp_path, dynamo_reset):
    argv = [*TINY, "--job.dump_folder", str(tmp_path / "run"), "--data.cache_dir", str(tmp_path / "cache")]
    trainer = Trainer(parse_args(argv))
    # warm-up: the first compile of each block, with and without autograd (n no-grad + k grad iterations)
    trainer.forward_backward(trainer.next_micro_batches(), 1, 1)
    trainer.optimizer.zero_grad(set_to_none=True)
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert compiled > 0  # compile is really on
    torch._dynamo.config.error_on_recompile = True  # any recompile from here on raises
    depths = set()
    for _ in range(20):
        out = trainer.train_step(trainer.next_micro_batches())
        depths.add((out["n"], out["k"]))
    assert len(depths) >= 5  # the depth really varied
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled
