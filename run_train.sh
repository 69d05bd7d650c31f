#!/usr/bin/env bash
# Train: ./run_train.sh [--job.config_file FILE] [--section.key value ...]
# FILE defaults to train_configs/debug_model.toml only when the flag is absent (the Python entry point decides;
# nothing is injected here, so a user-supplied --job.config_file is always the one loaded).
# NGPU (processes per node) and NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT select a torchrun launch.
set -euo pipefail
cd "$(dirname "$0")"
source raven_titan/ensure_env.sh
NGPU="${NGPU:-1}"
NNODES="${NNODES:-1}"
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES="${TORCHAO_FORCE_SKIP_LOADING_SO_FILES:-1}"
if [[ "$NGPU" == 1 && "$NNODES" == 1 ]]; then
  exec "$PYTHON" -m raven_titan.train "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nproc_per_node="$NGPU" --nnodes="$NNODES" \
  --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-localhost}" --master_port="${MASTER_PORT:-29500}" \
  -m raven_titan.train "$@"
