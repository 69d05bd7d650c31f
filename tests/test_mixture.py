"""Mixtures: the keyed permutation, weighted draws, epochs limits, their config, and the trainer's use of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raven_titan.config.manager import parse_args
from raven_titan.data.mixture import Mixture, Source, epoch_order
from raven_titan.errors import RavenError
from raven_titan.metrics.logger import scalars
from raven_titan.train import Trainer


def test_epoch_orders_are_seeded_permutations():
    n = 10_000
    a = epoch_order(n, 0, "web", 0)
    assert a.dtype == np.uint32 and np.array_equal(np.sort(a), np.arange(n))
    assert np.array_equal(a, epoch_order(n, 0, "web", 0))
    others = [epoch_order(n, 1, "web", 0), epoch_order(n, 0, "math", 0), epoch_order(n, 0, "web", 1)]
    for other in others:  # the seed, the source name and the epoch each give another order
        assert not np.array_equal(a, other)
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05


def draws(mixture: Mixture, batches: int, count: int):
    position, sources, ordinals = mixture.start(), [], []
    for _ in range(batches):
        src, ordinal, position = mixture.draw(position, count)
        sources.append(src)
        ordinals.append(ordinal)
    return np.concatenate(sources), np.concatenate(ordinals), position


def test_proportions_follow_the_weights():
    mixture = Mixture([Source("a", 10_000, 5), Source("b", 10_000, 3), Source("c", 10_000, 2)], seed=1)
    src, _, position = draws(mixture, 200, 64)
    n = len(src)
    for s, p in enumerate([0.5, 0.3, 0.2]):
        share = np.mean(src == s)
        assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n), (s, share)  # within 4 sigma
    assert position["consumed"] == {name: int(np.sum(src == s)) for s, name in enumerate("abc")}
    assert position["batches"] == 200


def test_draws_are_deterministic_and_seeded():
    sources = [Source("a", 100, 1), Source("b", 100, 1)]
    a = draws(Mixture(sources, seed=3), 10, 8)[0]
    assert np.array_equal(a, draws(Mixture(sources, seed=3), 10, 8)[0])
    assert not np.array_equal(a, draws(Mixture(sources, seed=4), 10, 8)[0])


def test_each_source_is_read_once_per_epoch_of_its_own():
    mixture = Mixture([Source("big", 1000, 1), Source("small", 30, 1)], seed=0)
    src, ordinal, _ = draws(mixture, 40, 16)
    rows = mixture.rows(src, ordinal)
    small = rows[src == 1]
    assert len(small) >= 90
    for e in range(3):
        assert sorted(small[30 * e : 30 * (e + 1)]) == list(range(30))  # every row once per epoch
    assert list(small[:30]) != list(small[30:60])  # reshuffled each epoch
    assert len(set(rows[src == 0])) == np.sum(src == 0)  # the big source has not finished an epoch


def test_epochs_limit_caps_a_source_and_hands_its_share_on():
    mixture = Mixture([Source("web", 10_000, 1), Source("math", 40, 1, epochs=1.5)], seed=2)
    src, ordinal, position = draws(mixture, 50, 16)
    assert position["consumed"]["math"] == 60  # floor(1.5 x 40) rows, then no more
    assert np.sum(src == 1) == 60 and np.all(src[np.flatnonzero(src == 1)[-1] + 1 :] == 0)
    rows = mixture.rows(src[src == 1], ordinal[src == 1])
    assert sorted(rows[:40]) == list(range(40)) and len(set(rows[40:])) == 20
    assert mixture.remaining(position) == float("inf")


def test_every_source_exhausted_is_a_clear_error():
    mixture = Mixture([Source("a", 10, 1, epochs=1), Source("b", 5, 1, epochs=2)], seed=0)
    assert mixture.remaining(mixture.start()) == 20
    src, _, position = draws(mixture, 5, 4)  # exactly 20 rows
    assert np.bincount(src).tolist() == [10, 10]
    with pytest.raises(RavenError, match="every data source reached its epochs limit after 20 rows"):
        mixture.draw(position, 4)


def test_adding_a_source_keeps_the_others_orders():
    a = Mixture([Source("web", 50, 1)], seed=0)
    b = Mixture([Source("new", 50, 1), Source("web", 50, 1)], seed=0)
    ordinal = np.arange(50)
    assert np.array_equal(a.rows(np.zeros(50, np.int64), ordinal), b.rows(np.ones(50, np.int64), ordinal))


# ---- config --------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mix.toml"
    path.write_text(text)
    return str(path)


SOURCES = (
    '[[data.sources]]\npath = "shakespeare"\nname = "a"\n[[data.sources]]\npath = "shakespeare"\nname = "b"\n'
)


def test_sources_from_toml_and_cli(tmp_path):
    cfg = write(tmp_path, SOURCES + "weight = 3\nepochs = 2\n")
    job = parse_args(["--job.config_file", cfg, "--data.sources.0.weight", "0.5"])
    assert [(s.name, s.weight, s.epochs) for s in job.data.sources] == [("a", 0.5, None), ("b", 3.0, 2.0)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (SOURCES + "wieght = 2\n", r"data.sources\[1\]: unknown key 'wieght' \(did you mean 'weight'\?\)"),
        (SOURCES + "weight = 0\n", r"data.sources\[1\].weight = 0.0 is out of range: it must be > 0"),
        (SOURCES + "epochs = -1\n", r"data.sources\[1\].epochs = -1"),
        (SOURCES.replace('"b"', '"a"'), "two data sources are named 'a'"),
        (
            '[data]\ndataset = "/x"\n' + SOURCES,
            "data.dataset = '/x' and \\[\\[data.sources\\]\\] are both set",
        ),
        ("[[data.sources]]\nweight = 2\n", r"data.sources\[0\] has no path"),
        ('[data]\nsources = ["a"]\n', r"data.sources\[0\] = 'a' has the wrong type: expected a table"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(RavenError, match=message):
        parse_args(["--job.config_file", write(tmp_path, text)])


# ---- the trainer ---------------------------------------------------------------------------------------

TINY = [
    "--model.n_embd", "64", "--model.n_heads", "2", "--model.intermediate_size", "128",
    "--training.seq_len", "32", "--lr_scheduler.warmup_steps", "1", "--lr_scheduler.decay_steps", "0",
    "--metrics.log_freq", "1", "--training.steps", "6", "--validation.freq", "6", "--validation.steps", "2",
    "--validation.depths", "1", "2",
]  # fmt: skip


def test_trainer_records_tokens_per_source_and_validates_each(tmp_path, tmp_path_factory):
    cfg = write(tmp_path, SOURCES + "weight = 3\n")
    cache = str(tmp_path_factory.mktemp("cache"))
    run = tmp_path / "run"
    job = parse_args(
        ["--job.config_file", cfg, *TINY, "--job.dump_folder", str(run), "--data.cache_dir", cache]
    )
    trainer = Trainer(job)
    trainer.train()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    rows_per_step = job.training.local_batch_size
    for r in train:
        per_source = r["tokens_per_source"]
        assert sum(per_source.values()) == r["step"] * rows_per_step * 32  # every row read is counted once
    final = train[-1]["tokens_per_source"]
    n = 6 * rows_per_step
    share = final["b"] / (32 * n)
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n)
    (val,) = [r for r in records if r["kind"] == "validation"]
    assert set(val["val_loss_by_source"]) == {"a", "b"}  # the same folder twice: the same losses
    assert val["val_loss_by_source"]["a"] == val["val_loss_by_source"]["b"]
    assert val["val_loss"] == pytest.approx(val["val_loss_by_source"]["a"], rel=1e-12)


def test_sink_names_of_per_source_values():
    train = scalars({"kind": "train", "step": 3, "loss": 2.5, "tokens_per_source": {"a": 64, "b": 32}})
    assert train == {"train/loss": 2.5, "train/tokens_per_source/a": 64.0, "train/tokens_per_source/b": 32.0}
    val = scalars(
        {"kind": "validation", "step": 3, "val_loss": {"4": 2.0}, "val_loss_by_source": {"a": {"4": 3.0}}}
    )
    assert val == {"validation/val_loss_d4": 2.0, "validation/val_loss_by_source/a_d4": 3.0}


def test_trainer_refuses_sources_too_small_for_the_run(tmp_path, tmp_path_factory):
    cfg = write(tmp_path, SOURCES.replace('name = "a"', 'name = "a"\nepochs = 0.001').replace(
        'name = "b"', 'name = "b"\nepochs = 0.001'))  # fmt: skip
    cache = str(tmp_path_factory.mktemp("cache"))
    job = parse_args(
        ["--job.config_file", cfg, *TINY, "--training.steps", "100", "--job.dump_folder", str(tmp_path / "r"),
         "--data.cache_dir", cache]
    )  # fmt: skip
    with pytest.raises(RavenError, match=r"epochs limits leave \d+ rows but the remaining 100 steps need"):
        Trainer(job)


def test_mixture_resume_with_workers_is_bit_exact(tmp_path, tmp_path_factory):
    # source b (weight 3) runs out after floor(0.0003 x ~47k) = 14 rows, around step 5: the resumed half
    # crosses the point where its share goes to a
    cfg = write(tmp_path, SOURCES + "weight = 3\nepochs = 0.0003\n")
    cache = str(tmp_path_factory.mktemp("cache"))

    def job(run: str, *extra: str):
        return parse_args(
            ["--job.config_file", cfg, *TINY, "--validation.no-enable", "--data.cache_dir", cache,
             "--checkpoint.enable", "--job.dump_folder", str(tmp_path / run), *extra]
        )  # fmt: skip

    def train_records(run: str) -> dict[int, tuple]:
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        return {r["step"]: (r["loss"], r["tokens_per_source"]) for r in recs if r["kind"] == "train"}

    Trainer(job("ref")).train()
    first = Trainer(job("cut", "--data.num_workers", "2"))
    for _ in range(3):
        first.train_step(first.next_micro_batches())
    first.checkpointer.save(first.step)
    second = Trainer(job("cut", "--data.num_workers", "2"))
    assert second.step == 3
    second.train()
    ref, cut = train_records("ref"), train_records("cut")
    assert {s: v for s, v in cut.items() if s > 3} == {s: v for s, v in ref.items() if s > 3}
    assert ref[6][1]["b"] == 14 * 32 and ref[6][1]["a"] == (6 * 8 - 14) * 32  # b capped, a took its share


def test_resume_with_a_source_added_continues_the_others(tmp_path, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    one = write(tmp_path, '[[data.sources]]\npath = "shakespeare"\nname = "a"\n')
    both = str(tmp_path / "both.toml")
    Path(both).write_text(SOURCES)
    common = [*TINY, "--validation.no-enable", "--data.cache_dir", cache, "--checkpoint.enable",
              "--checkpoint.interval", "3", "--job.dump_folder", str(tmp_path / "run")]  # fmt: skip
    first = Trainer(parse_args(["--job.config_file", one, *common, "--training.steps", "3"]))
    first.train()
    assert first.state.data["consumed"] == {"a": 3 * 8}
    second = Trainer(parse_args(["--job.config_file", both, *common, "--training.steps", "6"]))
    assert second.step == 3 and second.state.data["consumed"] == {"a": 24, "b": 0}
    second.train()
    consumed = second.state.data["consumed"]
    assert consumed["a"] > 24 and consumed["b"] > 0 and consumed["a"] + consumed["b"] == 6 * 8
