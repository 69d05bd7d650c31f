"""PNG figures from one or several run folders' `metrics.jsonl`.

    python -m raven_titan.metrics.plots RUN [RUN ...] --out DIR

Figures (one file each; every run is a line labelled with its folder name):

- `loss.png`: training loss and learning rate against tokens (step x global batch x seq_len, from the run's
  config.json; against the step when a run's global batch is not known, which the axis label says);
- `throughput.png`: tokens/s and TFLOP/s against the step;
- `val_by_depth.png`: validation loss against test-time depth (log scale), one curve per validation step
  coloured by step, one panel per run: the "perplexity by recurrence" figure of the Huginn report;
  standalone validations (`python -m raven_titan.eval.validate`) are dashed;
- `telemetry.png`: state norm, relative residual, token correlations, distance from the input and per-group
  gradient norm / effective LR against the step (the panels whose keys the records carry).

A figure whose records no run has is skipped with a message. When a step was logged twice (a resumed run
redoes the steps after its checkpoint), the last record wins. matplotlib is imported only here, lazily; it
is an optional dependency (`pip install -e '.[plots]'`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raven_titan.errors import RavenError, run_command

MATPLOTLIB_PIN = "matplotlib==3.11.2"

# telemetry panels: (title, y label, [(record key, line suffix)]); group keys ("<group>/grad_norm") are
# added per parameter group found in the records
_TELEMETRY_PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("state norm", "mean |ln_f(s_r)|", [("state_norm", "")]),
    ("relative residual", "|s_r - s_(r-1)| / |s_r|", [("rel_residual", "")]),
    ("token correlation", "mean pairwise correlation", [("latent_token_corr", " latent"), ("hidden_token_corr", " hidden")]),
    ("distance from input", "|s_r - e| / |e|", [("dist_from_input", "")]),
]  # fmt: skip
_GROUP_PANELS = [
    ("grad_norm", "gradient norm by group", "|g|"),
    ("eff_lr", "effective LR by group", "|dp| / |g|"),
]


@dataclass
class RunMetrics:
    """The records of one run folder, by kind, deduplicated by step (the last record wins) and sorted."""

    folder: Path
    label: str
    train: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    skipped_lines: int = 0

    def tokens_per_step(self) -> tuple[int | None, str]:
        """(global batch x seq_len, "") from config.json, or (None, why) when the global batch is unknown:
        no config.json, or training.global_batch_size = -1 (local batch x ranks) without explicit
        [parallelism] degrees to count the ranks."""
        if self.config is None:
            return None, "no config.json"
        t, par = self.config.get("training", {}), self.config.get("parallelism", {})
        gb, lb, seq = t.get("global_batch_size"), t.get("local_batch_size"), t.get("seq_len")
        if not isinstance(seq, int) or seq < 1:
            return None, "no training.seq_len in config.json"
        if isinstance(gb, int) and gb >= 1:
            return gb * seq, ""
        rep, shard = par.get("data_parallel_replicate_degree"), par.get("data_parallel_shard_degree")
        if (
            isinstance(lb, int)
            and isinstance(rep, int)
            and isinstance(shard, int)
            and rep >= 1
            and shard >= 1
        ):
            return lb * rep * shard * seq, ""
        return None, "training.global_batch_size = -1"

    def tokens(self, records: Sequence[dict[str, Any]]) -> list[float] | None:
        """Tokens seen at each train record: its own `tokens_seen` when every record has one, else
        step x tokens per step; None when unknown."""
        if records and all(isinstance(r.get("tokens_seen"), int) for r in records):
            return [float(r["tokens_seen"]) for r in records]
        per_step, _ = self.tokens_per_step()
        return None if per_step is None else [float(r["step"] * per_step) for r in records]


def load_run(folder: str | Path, label: str | None = None) -> RunMetrics:
    folder = Path(folder).expanduser()
    path = folder / "metrics.jsonl"
    if not path.is_file():
        what = "folder not found" if not folder.is_dir() else "no metrics.jsonl in it"
        raise RavenError(f"run {folder}: {what}; pass the job.dump_folder of a training run")
    run = RunMetrics(folder, label or folder.resolve().name)
    by_kind: dict[str, dict[Any, dict]] = {"train": {}, "validation": {}, "telemetry": {}}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            run.skipped_lines += 1  # e.g. a line cut short by a crash mid-write
            continue
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind not in by_kind or not isinstance(rec.get("step"), int):
            continue
        key = (rec["step"], rec.get("source", "training")) if kind == "validation" else rec["step"]
        by_kind[kind][key] = rec
    run.train = [by_kind["train"][k] for k in sorted(by_kind["train"])]
    run.telemetry = [by_kind["telemetry"][k] for k in sorted(by_kind["telemetry"])]
    run.validation = [
        by_kind["validation"][k]
        for k in sorted(by_kind["validation"], key=lambda k: (k[0], k[1] != "training"))
        if by_kind["validation"][k].get("val_loss")
    ]
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            run.config = json.loads(cfg.read_text())
        except json.JSONDecodeError:
            run.config = None
    return run


def _labels(folders: Sequence[Path]) -> list[str]:
    """Folder names; `parent/name` where two runs share a name."""
    names = [f.resolve().name for f in folders]
    return [
        f"{f.resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for f, n in zip(folders, names, strict=True)
    ]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        if key in r:
            xs.append(r["step"])
            ys.append(_num(r[key]))
    return xs, ys


def _figure(n_panels: int, ncols: int | None = None):
    from matplotlib.figure import Figure

    ncols = ncols or min(n_panels, 3)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.8 * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _integer_x(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401  (figures are drawn on matplotlib.figure.Figure: no pyplot, no backend)
    except ImportError:
        raise RavenError(
            f"plots need matplotlib, which is not installed: pip install {MATPLOTLIB_PIN} "
            "(or pip install -e '.[plots]')"
        ) from None


# ---- the figures ----------------------------------------------------------------------------------------


def loss_figure(runs: Sequence[RunMetrics]):
    with_train = [(i, r) for i, r in enumerate(runs) if r.train]
    if not with_train:
        return None, "no train records"
    unknown = {r.label: r.tokens_per_step()[1] for _, r in with_train if r.tokens(r.train) is None}
    if unknown:
        why = "; ".join(sorted(set(unknown.values())))
        xlabel = f"step (tokens unknown for {', '.join(unknown)}: {why})"
    elif all(r.train and isinstance(r.train[0].get("tokens_seen"), int) for _, r in with_train):
        xlabel = "tokens"
    else:
        xlabel = "tokens (step x global batch x seq_len)"
    fig, (ax_loss, ax_lr) = _figure(2)
    for i, r in with_train:
        for ax, key in ((ax_loss, "loss"), (ax_lr, "lr")):
            records = [rec for rec in r.train if key in rec]
            xs = [rec["step"] for rec in records] if unknown else r.tokens(records)
            ax.plot(xs, [_num(rec[key]) for rec in records], color=_colour(i), label=r.label)
    ax_loss.set(title="training loss", xlabel=xlabel, ylabel="loss")
    ax_lr.set(title="learning rate", xlabel=xlabel, ylabel="LR")
    for ax in (ax_loss, ax_lr):
        if unknown:
            _integer_x(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig, None


def throughput_figure(runs: Sequence[RunMetrics]):
    with_train = [(i, r) for i, r in enumerate(runs) if r.train]
    if not with_train:
        return None, "no train records"
    fig, (ax_tps, ax_flops) = _figure(2)
    for i, r in with_train:
        for ax, key in ((ax_tps, "tokens_per_second"), (ax_flops, "tflops")):
            xs, ys = _series(r.train, key)
            ax.plot(xs, ys, color=_colour(i), label=r.label)
    ax_tps.set(title="throughput", xlabel="step", ylabel="tokens / s")
    ax_flops.set(title="model FLOP/s", xlabel="step", ylabel="TFLOP/s")
    for ax in (ax_tps, ax_flops):
        _integer_x(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig, None


def val_by_depth_figure(runs: Sequence[RunMetrics]):
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

    with_val = [r for r in runs if r.validation]
    if not with_val:
        return None, "no validation records"
    fig, axes = _figure(len(with_val))
    cmap = colormaps["viridis"]
    for ax, r in zip(axes, with_val, strict=True):
        steps = [rec["step"] for rec in r.validation]
        norm = Normalize(min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1)
        all_depths: set[int] = set()
        for rec in r.validation:
            points = sorted((int(d), _num(v)) for d, v in rec["val_loss"].items() if str(d).isdigit())
            all_depths.update(d for d, _ in points)
            standalone = rec.get("source", "training") != "training"
            ax.plot(
                [d for d, _ in points], [v for _, v in points], marker="o", markersize=3,
                linestyle="--" if standalone else "-", color=cmap(norm(rec["step"])),
                label=f"step {rec['step']}" + (" (standalone)" if standalone else ""),
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_depths))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(
            title=f"{r.label}: validation loss by depth", xlabel="test-time recurrence depth", ylabel="loss"
        )
        ax.grid(alpha=0.3)
        if len(r.validation) <= 10:
            ax.legend(fontsize="small")
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="training step")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, None


def telemetry_figure(runs: Sequence[RunMetrics]):
    with_tel = [(i, r) for i, r in enumerate(runs) if r.telemetry]
    if not with_tel:
        return None, "no telemetry records"
    keys = set().union(*(rec.keys() for _, r in with_tel for rec in r.telemetry))
    panels = [(t, y, [(k, s) for k, s in lines if k in keys]) for t, y, lines in _TELEMETRY_PANELS]
    panels = [p for p in panels if p[2]]
    for suffix, title, ylabel in _GROUP_PANELS:
        groups = sorted(k for k in keys if k.endswith("/" + suffix))
        if groups:
            panels.append((title, ylabel, [(k, " " + k.rsplit("/", 1)[0]) for k in groups]))
    if not panels:
        return None, "telemetry records without any known key"
    fig, axes = _figure(len(panels))
    styles = ["-", "--", ":", "-."]
    for ax, (title, ylabel, lines) in zip(axes, panels, strict=True):
        for i, r in with_tel:
            for j, (key, suffix) in enumerate(lines):
                xs, ys = _series(r.telemetry, key)
                if xs:
                    ax.plot(
                        xs, ys, color=_colour(i), linestyle=styles[j % len(styles)], label=r.label + suffix
                    )
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        _integer_x(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig, None


FIGURES: dict[str, Callable] = {
    "loss.png": loss_figure,
    "throughput.png": throughput_figure,
    "val_by_depth.png": val_by_depth_figure,
    "telemetry.png": telemetry_figure,
}


def build_figures(runs: Sequence[str | Path], echo: Callable[[str], Any] | None = print) -> dict[str, Any]:
    """File name -> matplotlib Figure for each figure whose records exist (the others are reported through
    `echo` and left out)."""
    _require_matplotlib()
    if not runs:
        raise RavenError("no run folder given; pass one or more job.dump_folder paths")
    folders = [Path(r).expanduser() for r in runs]
    loaded = [load_run(f, label) for f, label in zip(folders, _labels(folders), strict=True)]
    for r in loaded:
        if r.skipped_lines and echo:
            echo(f"{r.folder / 'metrics.jsonl'}: skipped {r.skipped_lines} malformed line(s)")
    figures = {}
    for name, make in FIGURES.items():
        fig, why = make(loaded)
        if fig is None:
            if echo:
                echo(f"skipping {name}: {why} in {', '.join(r.label for r in loaded)}")
            continue
        figures[name] = fig
    return figures


def make_plots(
    runs: Sequence[str | Path], out_dir: str | Path, echo: Callable[[str], Any] | None = print
) -> list[Path]:
    """Write the PNG figures of `runs` into `out_dir` (created if needed); return the written files."""
    figures = build_figures(runs, echo)
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out / name
        fig.savefig(path, dpi=120)
        written.append(path)
        if echo:
            echo(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raven_titan.metrics.plots",
        description=(
            "PNG figures from the metrics.jsonl of one or several run folders: loss.png (training loss and LR "
            "against tokens), throughput.png, val_by_depth.png (validation loss against test-time depth, one "
            f"curve per validation step) and telemetry.png. Needs matplotlib ({MATPLOTLIB_PIN})."
        ),
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders (job.dump_folder) holding metrics.jsonl"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files (created if needed)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> None:
        if not make_plots(args.runs, args.out):
            raise RavenError("nothing to plot: the runs have no train, validation or telemetry records")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
