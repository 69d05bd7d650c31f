"""Load a job: TOML (with `base = "other.toml"` inheritance) -> typed JobConfig -> CLI overrides -> validation.

Precedence is CLI > TOML > dataclass defaults. Unknown keys, wrong types and out-of-range values are
reported as one-line `RavenError`s that name the file, the key and the fix. Cross-field checks run in one
pass (`validate`) before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import tyro

from raven_titan.config.job_config import SECTION_TYPES, Ge, Gt, JobConfig, Le
from raven_titan.errors import RavenError

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---- TOML loading ---------------------------------------------------------------------------------------


def find_config_file(argv: list[str]) -> str | None:
    """The value of the last `--job.config_file` / `--job.config-file` in argv (both `--k v` and `--k=v`)."""
    found = None
    for i, arg in enumerate(argv):
        for flag in ("--job.config_file", "--job.config-file"):
            if arg == flag:
                if i + 1 >= len(argv):
                    raise RavenError(f"{flag} needs a value: {flag} train_configs/debug_model.toml")
                found = argv[i + 1]
            elif arg.startswith(flag + "="):
                found = arg[len(flag) + 1 :]
    return found


def load_toml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a job TOML, merging it over its `base` file (recursively; the including file wins)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RavenError(f"config file not found: {path}; pass an existing file to --job.config_file")
    resolved = path.resolve()
    if resolved in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, resolved))
        raise RavenError(f"config inheritance cycle: {cycle}; remove one of the `base` keys")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RavenError(f"{path}: malformed TOML ({e}); fix the syntax at that line") from None
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RavenError(f'{path}: `base` must be a file name string, e.g. base = "debug_model.toml"')
    parent = load_toml(resolved.parent / base, (*_chain, resolved))
    return _deep_merge(parent, data)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---- type and range checking ----------------------------------------------------------------------------


def _suggest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def check_value(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` (int -> float only), or raise a RavenError naming `where`."""
    constraints: tuple = ()
    if typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
        constraints = tuple(m for m in meta if isinstance(m, (Ge, Gt, Le)))
    value = _check_type(value, tp, where)
    for c in constraints:
        op, ok = {Ge: (">=", value >= c.bound), Gt: (">", value > c.bound), Le: ("<=", value <= c.bound)}[
            type(c)
        ]
        if not ok:
            raise RavenError(f"{where} = {value!r} is out of range: it must be {op} {c.bound:g}")
    return value


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = RavenError(f"{where} = {value!r} has the wrong type: expected {_type_name(tp)}")
    if tp is Any:
        return value
    if origin is typing.Annotated:
        return check_value(value, tp, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return check_value(value, arg, where)
            except RavenError as e:
                last = e
        if type(None) in typing.get_args(tp) and len(typing.get_args(tp)) == 2:
            raise last
        raise bad
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            hint = _suggest(str(value), [str(c) for c in choices])
            raise RavenError(f"{where} = {value!r} is not a valid choice: use one of {list(choices)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise bad
        return value
    if dataclasses.is_dataclass(tp):  # a table inside a section, e.g. one of [[data.sources]]
        return _check_table(value, tp, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in the config definitions


def _check_table(value: Any, cls: type, where: str) -> Any:
    """A TOML table (dict) or an instance of dataclass `cls`, with every field checked."""
    hints = _section_hints(cls)
    if isinstance(value, cls):
        value = {k: getattr(value, k) for k in hints}
    if not isinstance(value, dict):
        raise RavenError(
            f"{where} = {value!r} has the wrong type: expected a table with keys {', '.join(hints)}"
        )
    for key in value:
        if key not in hints:
            raise RavenError(
                f"{where}: unknown key '{key}'{_suggest(key, list(hints))}; keys: {', '.join(hints)}"
            )
    return cls(**{k: check_value(v, hints[k], f"{where}.{k}") for k, v in value.items()})


def _section_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def config_from_dict(data: dict[str, Any], source: str) -> JobConfig:
    """Build a JobConfig from a TOML-shaped dict, rejecting unknown sections/keys and bad values."""
    sections = {}
    all_keys = {name: list(_section_hints(cls)) for name, cls in SECTION_TYPES.items()}
    for name, body in data.items():
        if name not in SECTION_TYPES:
            raise RavenError(
                f"{source}: unknown section [{name}]{_suggest(name, list(SECTION_TYPES))}; "
                f"valid sections: {', '.join(SECTION_TYPES)}"
            )
        if not isinstance(body, dict):
            raise RavenError(f"{source}: `{name}` must be a [{name}] table, not a value")
        cls = SECTION_TYPES[name]
        hints = _section_hints(cls)
        kwargs = {}
        for key, value in body.items():
            if key not in hints:
                hint = _suggest(key, list(hints))
                if not hint:
                    elsewhere = [s for s, keys in all_keys.items() if key in keys]
                    hint = f" (it belongs in [{elsewhere[0]}])" if elsewhere else ""
                raise RavenError(
                    f"{source}: unknown key '{key}' in [{name}]{hint}; run with --help to list the options"
                )
            kwargs[key] = check_value(value, hints[key], f"{source}: {name}.{key}")
        sections[name] = cls(**kwargs)
    return JobConfig(**sections)


def check_config_types(job: JobConfig) -> None:
    """Type- and range-check every field of a (possibly CLI-modified) JobConfig."""
    for f in dataclasses.fields(job):
        section = getattr(job, f.name)
        for key, tp in _section_hints(type(section)).items():
            check_value(getattr(section, key), tp, f"{f.name}.{key}")


# ---- the whole parse ------------------------------------------------------------------------------------


def parse_args(argv: list[str], default_config: str | None = None) -> JobConfig:
    """TOML named by --job.config_file (else `default_config`), then CLI overrides, then validation."""
    config_file = find_config_file(argv) or default_config
    if config_file is not None:
        job = config_from_dict(load_toml(config_file), str(config_file))
        job.job.config_file = str(config_file)
    else:
        job = JobConfig()
    job = tyro.cli(JobConfig, args=argv, default=job, use_underscores=True)
    validate(job)
    return job


def validate(job: JobConfig) -> None:
    """All checks that need several fields, in one pass before anything is allocated."""
    from raven_titan.data.default_corpus import source_list
    from raven_titan.models import get_model_spec
    from raven_titan.optim.lr_scheduler import check_schedule
    from raven_titan.parallel import data_parallel_size

    check_config_types(job)
    source_list(job.data)
    spec = get_model_spec(job.model.name)
    args = spec.resolve_args(job.model)
    t = job.training
    if t.seq_len > args.block_size:
        raise RavenError(
            f"training.seq_len = {t.seq_len} exceeds the RoPE table (model.block_size = {args.block_size}); "
            "lower training.seq_len or raise model.block_size"
        )
    dp = data_parallel_size(job.parallelism)
    if t.global_batch_size != -1:
        if t.global_batch_size < 1 or t.global_batch_size % (t.local_batch_size * dp):
            raise RavenError(
                f"training.global_batch_size = {t.global_batch_size} is not a positive multiple of "
                f"training.local_batch_size x data-parallel size = {t.local_batch_size} x {dp}; "
                "change one of them"
            )
    problem = check_schedule(job.lr_scheduler, t.steps)
    if problem:
        raise RavenError(problem)
    if job.validation.enable and not [d for d in job.validation.depths if d <= job.validation.max_depth]:
        raise RavenError("validation.depths has no entry <= validation.max_depth; add a smaller depth")
    if (job.checkpoint.export_hf_at_end or job.hub.repo_id) and dp > 1 and not job.checkpoint.enable:
        raise RavenError(
            "exporting or pushing a multi-process run needs checkpoint.enable = true (the export is written "
            "from the final checkpoint)"
        )
    if any(d < 1 for d in job.validation.depths):
        raise RavenError("validation.depths entries must be >= 1")


def resolved_dict(job: JobConfig) -> dict[str, Any]:
    """The config as written to config.json: every section, with the model fields resolved from the flavor."""
    from raven_titan.models import get_model_spec

    out = dataclasses.asdict(job)
    args = get_model_spec(job.model.name).resolve_args(job.model)
    out["model"].update(dataclasses.asdict(args))
    return out


def dump_config(job: JobConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(resolved_dict(job), indent=2) + "\n")
    tmp.replace(path)
    return path


def repo_path(path: str) -> Path:
    """A user path: absolute, `~`, relative to the CWD if it exists there, else to the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p
