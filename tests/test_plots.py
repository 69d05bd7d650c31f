"""`python -m raven_titan.metrics.plots`: PNG files from sample metrics.jsonl files, with the expected panels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from raven_titan.errors import RavenError
from raven_titan.metrics import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VAL_STEPS = (10, 20, 30)


def write_run(folder: Path, global_batch: int = 8, validation: bool = True, telemetry: bool = True) -> Path:
    folder.mkdir(parents=True)
    config = {"training": {"global_batch_size": global_batch, "local_batch_size": 4, "seq_len": 32}}
    config["parallelism"] = {"data_parallel_shard_degree": -1, "data_parallel_replicate_degree": -1}
    (folder / "config.json").write_text(json.dumps(config))
    records = []
    for step in range(1, 31):
        records.append(
            {"kind": "train", "step": step, "loss": 9.0 - step / 10, "lr": 1e-3 * min(step, 5) / 5,
             "grad_norm": 1.0, "tokens_per_second": 1000.0 + step, "tflops": 0.5, "mfu": None}
        )  # fmt: skip
    records.append({**records[4], "loss": 1.5})  # step 5 logged again (a resumed run): the last one wins
    if validation:
        for step in VAL_STEPS:
            losses = {str(d): 8.0 - step / 10 - d / 16 for d in (1, 4, 8, 32)}
            records.append({"kind": "validation", "step": step, "val_loss": losses, "val_ppl": {}})
        standalone = {"1": 5.0, "8": 4.0}
        records.append(
            {"kind": "validation", "step": 30, "val_loss": standalone, "val_ppl": {}, "source": "standalone"}
        )
    if telemetry:
        for step in (10, 20, 30):
            records.append(
                {"kind": "telemetry", "step": step, "state_norm": 8.0, "rel_residual": 0.4,
                 "latent_token_corr": 0.1, "hidden_token_corr": 0.2, "dist_from_input": 1.4,
                 "weights/grad_norm": 1.0, "embedding/grad_norm": 0.5, "weights/eff_lr": 1e-3,
                 "embedding/eff_lr": 2e-3}
            )  # fmt: skip
    lines = [json.dumps(r) for r in records] + ['{"kind": "train", "step": 31, "lo']  # a line cut short
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def panel(fig, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def test_pngs_are_written_for_every_figure(tmp_path):
    run = write_run(tmp_path / "run_a")
    messages = []
    written = plots.make_plots([run], tmp_path / "out", echo=messages.append)
    names = ["loss.png", "throughput.png", "val_by_depth.png", "telemetry.png"]
    assert written == [tmp_path / "out" / n for n in names]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    assert any("skipped 1 malformed line" in m for m in messages)


def test_figures_have_the_expected_panels_and_lines(tmp_path):
    a = write_run(tmp_path / "run_a")
    b = write_run(tmp_path / "run_b", validation=False, telemetry=False)
    figs = plots.build_figures([a, b], echo=None)
    assert list(figs) == ["loss.png", "throughput.png", "val_by_depth.png", "telemetry.png"]

    loss = figs["loss.png"]
    assert titles(loss) == ["training loss", "learning rate"]
    ax = panel(loss, "training loss")
    assert [line.get_label() for line in ax.get_lines()] == ["run_a", "run_b"]
    assert ax.get_xlabel() == "tokens (step x global batch x seq_len)"
    x, y = ax.get_lines()[0].get_data()
    assert list(x[:2]) == [1 * 8 * 32, 2 * 8 * 32]  # tokens = step x global batch x seq_len
    assert len(x) == 30 and y[4] == 1.5  # step 5 once, its last record; the cut-short line is ignored

    assert titles(figs["throughput.png"]) == ["throughput", "model FLOP/s"]
    assert all(len(ax.get_lines()) == 2 for ax in figs["throughput.png"].axes if ax.get_title())

    # only run_a has validation records: one panel, one curve per validation record, log-scale depth
    ax = panel(figs["val_by_depth.png"], "run_a: validation loss by depth")
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["step 10", "step 20", "step 30", "step 30 (standalone)"]
    assert ax.get_xscale() == "log"
    assert list(lines[0].get_xdata()) == [1, 4, 8, 32]
    assert lines[-1].get_linestyle() == "--"
    assert len({line.get_color() for line in lines[:3]}) == 3  # coloured by step

    tel = figs["telemetry.png"]
    assert titles(tel) == [
        "state norm", "relative residual", "token correlation", "distance from input",
        "gradient norm by group", "effective LR by group",
    ]  # fmt: skip
    assert [line.get_label() for line in panel(tel, "token correlation").get_lines()] == [
        "run_a latent",
        "run_a hidden",
    ]
    assert len(panel(tel, "gradient norm by group").get_lines()) == 2  # embedding, weights


def test_unknown_global_batch_falls_back_to_steps(tmp_path):
    run = write_run(tmp_path / "run", global_batch=-1)
    fig = plots.build_figures([run], echo=None)["loss.png"]
    ax = panel(fig, "training loss")
    assert ax.get_xlabel().startswith("step (tokens unknown for run: training.global_batch_size = -1")
    assert list(ax.get_lines()[0].get_xdata()[:3]) == [1, 2, 3]


def test_figures_without_records_are_skipped_with_a_message(tmp_path):
    run = write_run(tmp_path / "run", validation=False, telemetry=False)
    messages = []
    written = plots.make_plots([run], tmp_path / "out", echo=messages.append)
    assert [p.name for p in written] == ["loss.png", "throughput.png"]
    assert "skipping val_by_depth.png: no validation records in run" in messages
    assert "skipping telemetry.png: no telemetry records in run" in messages


def test_command_line(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert plots.main([str(run), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "val_by_depth.png").is_file()
    capsys.readouterr()
    assert plots.main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run ") and "folder not found" in err and err.count("\n") == 1


def test_missing_matplotlib_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(RavenError, match=r"pip install matplotlib==\d"):
        plots.make_plots([write_run(tmp_path / "run")], tmp_path / "out")
