#!/usr/bin/env bash
# The learning checks the default test run leaves out: every test marked `slow` (a short
# training run that must beat a random policy or reach a return, ~5-60 s each on 2 cores).
# Extra arguments go to pytest, e.g. `benchmarks/learning_checks.sh -k dqn -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
# -m slow replaces pyproject's `-m 'not slow'` (the last -m wins); --timeout lifts the
# default per-test limit, which is sized for the fast tests.
exec uv run pytest -m slow --timeout=900 --durations=0 "$@"
