"""The job configuration: one dataclass per section. Field docstrings are the `--help` text.

Option names follow TorchTitan (<= v0.2.x) where an equivalent exists. Each component receives only its own
section. Range constraints are declared with `Annotated[..., Ge(x)]` etc. and checked by
`raven_titan.config.manager` together with the types, for TOML and CLI values alike.
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Annotated, Any, Literal, get_type_hints

import tyro

from raven_titan.models.raven.args import RavenArgs


@dataclass(frozen=True)
class Ge:
    """Value must be >= bound."""

    bound: float


@dataclass(frozen=True)
class Gt:
    """Value must be > bound."""

    bound: float


@dataclass(frozen=True)
class Le:
    """Value must be <= bound."""

    bound: float


PosInt = Annotated[int, Ge(1)]
NonNegInt = Annotated[int, Ge(0)]
PosFloat = Annotated[float, Gt(0)]
NonNegFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Ge(0), Le(1)]


@dataclass
class Job:
    config_file: str | None = None
    """Job TOML to load (default: train_configs/debug_model.toml when run through run_train.sh)."""
    dump_folder: str = "./outputs/debug"
    """Run folder: config.json, metrics.jsonl, checkpoints and exports go here."""
    description: str = ""
    """Free-text description of the run."""
    dry_run: bool = False
    """Build the model on the meta device and print parameters, FLOPs, memory and batch layout; train nothing."""
    print_config: bool = False
    """Log the resolved configuration at start-up."""


@dataclass
class Training:
    steps: PosInt = 100
    """Optimizer steps to train."""
    local_batch_size: PosInt = 8
    """Sequences per micro-batch on each data-parallel rank."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 = local_batch_size x data-parallel size (no accumulation).
    Larger values use gradient accumulation; must be divisible by local_batch_size x data-parallel size."""
    seq_len: PosInt = 256
    """Tokens per training sequence (must not exceed model.block_size)."""
    seed: NonNegInt = 0
    """Seed for weight init, data order, recurrence depths and latent-state noise."""
    mixed_precision_param: Literal["bfloat16", "float32"] = "bfloat16"
    """Compute dtype of matmuls (autocast); master weights, gradients and optimizer state stay fp32."""
    max_norm: NonNegFloat = 1.0
    """Global gradient-norm clipping threshold (0 disables clipping; the norm is still logged)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """Non-finite loss or gradient norm: stop the run with an error, or skip the optimizer step."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to train on; auto = cuda when available, else cpu."""
    ignore_index: int = -100
    """Label id excluded from the loss."""
    time_limit_minutes: NonNegFloat = 0.0
    """Wall-clock budget of this process: stop at the step boundary after it is spent, saving a checkpoint
    when checkpointing is on (0: no limit). For schedulers that kill without a warning signal."""


@dataclass
class Optimizer:
    name: Literal["AdamW", "ELLISAdam"] = "AdamW"
    """AdamW (torch) or ELLISAdam (Huginn: atan2 direction, update clipping, running init, decoupled wd)."""
    lr: PosFloat = 3e-3
    """Peak learning rate."""
    beta1: Fraction = 0.9
    """First-moment decay."""
    beta2: Fraction = 0.95
    """Second-moment decay."""
    eps: PosFloat = 1e-8
    """Adam epsilon (ELLISAdam: floor of the second moment under update clipping)."""
    weight_decay: NonNegFloat = 0.1
    """Weight decay (decoupled)."""
    no_weight_decay_for_bias_and_norm: bool = True
    """Exclude norm gains and biases (incl. qk_bias) from weight decay."""
    update_clipping: bool = True
    """ELLISAdam: divide the step by max(1, RMS(g^2 / v))."""
    atan_adam: bool = True
    """ELLISAdam: direction atan2(m, sqrt(v_hat)) instead of m / (sqrt(v_hat) + eps)."""
    running_init: bool = True
    """ELLISAdam: initialise m and v from the first gradient instead of zeros."""
    decouple_wd: bool = True
    """ELLISAdam: shrink by wd x (lr / peak lr) per step, independent of the lr magnitude."""


@dataclass
class LRScheduler:
    schedule: Literal["warmup-stable-decay", "cosine", "linear", "constant"] = "warmup-stable-decay"
    """LR shape after warm-up. warmup-stable-decay is Huginn's trapezoid."""
    warmup_steps: NonNegInt = 10
    """Linear warm-up steps from 0 to the peak LR."""
    decay_steps: NonNegInt = 0
    """warmup-stable-decay: length of the final linear decay to min_lr_factor (0: no decay)."""
    min_lr_factor: Fraction = 0.0
    """Final LR as a fraction of the peak LR."""


@dataclass
class Metrics:
    log_freq: PosInt = 10
    """Log a console line and a metrics.jsonl record every this many steps (and at the last step)."""
    enable_jsonl: bool = True
    """Write metrics.jsonl in the run folder."""
    enable_tensorboard: bool = False
    """Also write every record to TensorBoard event files in <dump_folder>/tb (needs `pip install tensorboard`)."""
    enable_wandb: bool = False
    """Also log every record to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "raven_titan"
    """W&B project name."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: write the run under <dump_folder>/wandb for a later `wandb sync`; online: stream it."""
    telemetry_freq: NonNegInt = 0
    """Every this many steps, record recurrence telemetry (state norms, relative residual, token correlation
    of latent and last hidden state: collapse warning) and per-group gradient norm / update size (0: off)."""


@dataclass
class Validation:
    enable: bool = True
    """Evaluate the held-out split at several test-time depths."""
    freq: PosInt = 100
    """Validate every this many steps (and after the last step)."""
    steps: PosInt = 4
    """Validation batches per evaluation."""
    depths: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32, 64])
    """Test-time recurrence depths to evaluate (all iterations without gradients)."""
    max_depth: PosInt = 64
    """Depths above this are dropped from `depths` (to bound the cost of large models)."""


@dataclass
class DataSource:
    path: str = ""
    """'shakespeare' (the built-in corpus) or a folder of prepared token shards."""
    weight: PosFloat = 1.0
    """Relative share of training rows drawn from this source (normalised over the sources)."""
    epochs: Annotated[float, Gt(0)] | None = None
    """At most this many passes over the source's rows, then its share goes to the others (None: no limit)."""
    name: str = ""
    """Label in logs and metrics (default: the folder name); the source's shuffling key."""


@dataclass
class Data:
    dataset: str = "shakespeare"
    """'shakespeare' (built-in corpus, prepared on first use) or a prepared folder; mixtures: [[data.sources]]."""
    sources: list[DataSource] = field(default_factory=list)
    """Mixture: [[data.sources]] tables with path, weight, epochs, name (TOML; the CLI can change the fields of
    listed sources, e.g. --data.sources.0.weight 2). Empty: the single source data.dataset."""
    tokenizer: str = "tokenizer/shakespeare_4k"
    """Folder holding tokenizer.json (relative paths resolve against the repository root)."""
    cache_dir: str = "~/.cache/raven_titan"
    """Where the built-in corpus is prepared and the record of verified shards is kept."""
    num_workers: NonNegInt = 0
    """DataLoader worker processes (0: load in the training process)."""
    val_fraction: Annotated[float, Gt(0), Le(0.5)] = 0.05
    """Built-in corpus: fraction of rows held out for validation."""


@dataclass
class Parallelism:
    data_parallel_mode: Literal["fsdp", "chunked"] = "fsdp"
    """fsdp: FSDP2 fully_shard (HSDP when the replicate degree is > 1); chunked: replicated parameters with
    gradients averaged in fixed-size messages (Huginn's "simple DDP"; needs data_parallel_shard_degree 1)."""
    data_parallel_shard_degree: int = -1
    """FSDP shard degree; -1 = all ranks not used by the replicate dimension."""
    data_parallel_replicate_degree: int = -1
    """Replicate degree (HSDP's outer dimension); -1 = 1 for fsdp, all ranks for chunked."""
    replicate_reduce: Literal["native", "chunked"] = "native"
    """HSDP: reduce the replicate dimension with FSDP's own all-reduce, or through the chunked all-reduce."""
    chunk_size_mb: PosFloat = 64.0
    """Chunked all-reduce: size of every message (MiB); Huginn used 64 MB to avoid interconnect hangs."""
    allreduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """Chunked all-reduce: dtype on the wire."""
    overlap_reduce: bool = False
    """Chunked data parallel: send full chunks during backward (hooks) instead of after it."""
    fsdp_reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (re-gather in backward); the root unit never reshards."""
    timeout_seconds: PosInt = 600
    """Process-group timeout: how long a rank waits at a collective before failing."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "per-iteration", "selective", "full"] = "per-iteration"
    """none; per-iteration (each gradient core iteration recomputed in backward: memory O(k)); selective
    (per iteration, op-level: matmul and attention outputs kept, element-wise ops recomputed); full (every
    block, prelude and coda included, recomputed in backward)."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each block (the recurrence loop stays in Python, so random depths never recompile)."""


@dataclass
class Float8:
    enable: bool = False
    """Train eligible linear layers in float8 (torchao). Fast on SM89+ GPUs; on CPU for correctness only."""
    recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"] = "tensorwise"
    """torchao float8 scaling recipe."""
    filter_fqns: list[str] = field(default_factory=lambda: ["lm_head"])
    """Module names (substrings) kept in high precision; layers with a dimension not divisible by 16 always are."""
    enable_fsdp_float8_all_gather: bool = False
    """tensorwise + FSDP: all-gather weights in float8."""
    precompute_float8_dynamic_scale_for_fsdp: bool = False
    """With float8 all-gather: compute every weight's scale in one all-reduce after the optimizer step."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save checkpoints (torch.distributed.checkpoint) in <dump_folder>/<folder>/step-N, resume from the latest
    one automatically, and save at the next step boundary on SIGTERM / SIGUSR1 before exiting."""
    folder: str = "checkpoint"
    """Checkpoint folder inside the run folder."""
    interval: PosInt = 500
    """Save every this many steps (and at the last step)."""
    keep_latest_k: Annotated[int, Ge(2)] = 2
    """Complete checkpoints to keep (>= 2, so the newest can be mid-write without losing the last good one)."""
    async_mode: Literal["disabled", "async"] = "disabled"
    """async: stage the state, then write the files in the background while training goes on (the step
    folder appears once the write is complete, at the next save or the end)."""
    load_step: int = -1
    """Step to resume from; -1 = the latest complete checkpoint in the folder (rerunning a command resumes)."""
    exclude_from_loading: list[
        Literal["model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng"]
    ] = field(default_factory=list)
    """States not restored on resume: dataloader restarts the data order (needed when the rows read per
    micro-batch step, data-parallel size x local batch size, changed)."""
    initial_load_path: str = ""
    """Initial weights when the run folder has no checkpoint yet: a checkpoint step folder of another run
    (e.g. a seed checkpoint; any layout), or a Hugging Face folder or Hub repo in the Huginn-0125 layout (e.g.
    the released weights). Model only. Ignored, with a log line, once the run has a checkpoint."""
    export_hf_at_end: bool = False
    """After the last step, write a Hugging Face export to <dump_folder>/hf/step-N (also done when [hub] pushes)."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of exported weights."""


@dataclass
class Hub:
    repo_id: str = ""
    """Hugging Face Hub repository to push exports to, as ORG/NAME; empty = no pushes. The token comes from
    HF_TOKEN or `hf auth login`, never from the config."""
    private: bool = True
    """Create the repository as private (applies only when it does not exist yet)."""
    push_at_end: bool = True
    """Push an export at the final checkpoint of the run."""
    push_every_n_checkpoints: NonNegInt = 0
    """Also push an export every N-th checkpoint save (0 = never)."""
    revision_per_step: bool = False
    """Push step N to its own branch `step-N` (created from main if needed) instead of main."""
    max_retries: NonNegInt = 3
    """Retries of a push after a transient failure (HTTP 5xx/429, connection errors, timeouts)."""
    backoff_seconds: NonNegFloat = 2.0
    """Wait before the first retry; doubles with each further retry (capped at 300 s)."""


# ---- [model]: name + flavor + an optional override for every RavenArgs field -------------------------------


def _field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _make_model_section() -> type:
    docs = _field_docs(RavenArgs)
    hints = get_type_hints(RavenArgs)
    namespace = {"__module__": __name__}
    spec: list[Any] = [
        ("name", Annotated[str, tyro.conf.arg(help="Model family in the registry.")], field(default="raven")),
        (
            "flavor",
            Annotated[str, tyro.conf.arg(help="Named shape in the registry; the fields below override it.")],
            field(default="debug"),
        ),
    ]
    for f in fields(RavenArgs):
        base = hints[f.name]
        help_text = docs.get(f.name, "") + " [None: the flavor's value]"
        spec.append((f.name, Annotated[base | None, tyro.conf.arg(help=help_text)], field(default=None)))
    return make_dataclass("Model", spec, namespace=namespace)


Model = _make_model_section()
MODEL_OVERRIDE_FIELDS = tuple(f.name for f in fields(RavenArgs))


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    """Run identity, output folder, dry run."""
    model: Model = field(default_factory=Model)  # type: ignore[valid-type]
    """Model family, flavor and shape overrides."""
    training: Training = field(default_factory=Training)
    """Steps, batch, sequence length, precision, clipping."""
    optimizer: Optimizer = field(default_factory=Optimizer)
    """Optimizer and its hyperparameters."""
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    """Learning-rate schedule (applied to every parameter group)."""
    metrics: Metrics = field(default_factory=Metrics)
    """Console and metrics.jsonl logging."""
    validation: Validation = field(default_factory=Validation)
    """Per-depth validation on the held-out split."""
    data: Data = field(default_factory=Data)
    """Dataset, tokenizer and loader."""
    parallelism: Parallelism = field(default_factory=Parallelism)
    """Data-parallel layout."""
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    """Activation checkpointing."""
    compile: Compile = field(default_factory=Compile)
    """torch.compile."""
    float8: Float8 = field(default_factory=Float8)
    """float8 training (torchao)."""
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    """Checkpointing."""
    hub: Hub = field(default_factory=Hub)
    """Publishing Hugging Face exports to the Hub."""


SECTION_TYPES: dict[str, type] = {f.name: f.default_factory().__class__ for f in fields(JobConfig)}  # type: ignore[misc]
