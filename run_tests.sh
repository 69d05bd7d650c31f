#!/usr/bin/env bash
# The whole test suite (lint + pytest). Extra arguments go to pytest, e.g. ./run_tests.sh -k config
set -euo pipefail
cd "$(dirname "$0")"
source raven_titan/ensure_env.sh
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
"$PYTHON" -m ruff check raven_titan tests bench tokenizer data_prep
"$PYTHON" -m ruff format --check raven_titan tests bench tokenizer data_prep
exec "$PYTHON" -m pytest "$@"
