"""float8 (torchao) on CPU, for correctness: conversion with filters, and training close to bf16."""

from __future__ import annotations

import pytest

from raven_titan.config.manager import parse_args
from raven_titan.train import Trainer

pytest.importorskip("torchao.float8")
TINY = [
    "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
    "--training.seq_len", "32", "--training.local_batch_size", "4", "--training.steps", "5",
    "--lr_scheduler.warmup_steps", "1", "--validation.no-enable",
]  # fmt: skip


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_trains_close_to_bf16(tmp_path, recipe):
    from torchao.float8.float8_linear import Float8Linear

    common = [*TINY, "--data.cache_dir", str(tmp_path / "cache")]
    bf16 = Trainer(parse_args([*common, "--job.dump_folder", str(tmp_path / "a")]))
    f8 = Trainer(parse_args([*common, "--job.dump_folder", str(tmp_path / "b"), "--float8.enable",
                             "--float8.recipe", recipe]))  # fmt: skip
    names = {n for n, m in f8.model.named_modules() if isinstance(m, Float8Linear)}
    assert "transformer.core_block.0.attn.Wqkv" in names and "transformer.adapter" in names
    assert "lm_head" not in names  # filtered (and tied to the embedding)
    assert f8.model.lm_head.weight is f8.model.transformer.wte.weight
    assert sorted(dict(f8.model.named_parameters())) == sorted(dict(bf16.model.named_parameters()))
    a = [bf16.train_step(bf16.next_micro_batches())["loss"] for _ in range(5)]
    b = [f8.train_step(f8.next_micro_batches())["loss"] for _ in range(5)]
    assert b == pytest.approx(a, rel=0.02)
    assert b != a  # the fp8 path really ran
    assert b[-1] < b[0]
