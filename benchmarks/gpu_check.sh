#!/usr/bin/env bash
# The GPU check in one command: the GPU's name, the package versions and one Markdown table
# (PPO Pong at 64 envs eager / thunder / torch.compile / bf16-mixed with the learning check,
# SAC Hopper eager vs compiled, DQN Pong), within 8 minutes on one GPU. The rows and the
# table are benchmarks/gpu_check.py's; this passes its arguments on:
#
#   bash benchmarks/gpu_check.sh              # on a GPU machine; table also in $OUT/gpu_table.md
#   bash benchmarks/gpu_check.sh --dry-run    # on a CPU: every row with a tiny budget
#
# PYTHON names the interpreter (default: `uv run python` where uv is installed, else python3,
# as on a GPU image whose python3 holds torch and the package's wheels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
    read -r -a python <<<"$PYTHON"
elif command -v uv >/dev/null; then
    python=(uv run --quiet python)
else
    python=(python3)
fi
# Python holds its output back when piped (tee, a remote runner): rows appear as they finish.
export PYTHONUNBUFFERED=1
exec "${python[@]}" benchmarks/gpu_check.py "$@"
