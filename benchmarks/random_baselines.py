"""Measure the random baseline of every shipped config's env and write the package's table.

Usage:
    nice -n 10 uv run python benchmarks/random_baselines.py [CONFIG.yaml ...] [--episodes N]

For each config (default: every ``configs/*.yaml``) reads the env spec under
``model.init_args.env``, measures the mean return of ``--episodes`` episodes of uniformly random
actions (``slm_lightning.lab.baseline.measure_random_return``: 10 sub-envs, seed 0, equal
episodes from each) once per baseline key, prints a table (config, env, key, mean return,
seconds) and writes ``slm_lightning/lab/random_baselines.json``, the values ``slm-lab trial``
uses without measuring. Without config arguments the file is rewritten with exactly the keys of
the shipped configs; with them, their entries are added to it (e.g. to re-measure one env with
another episode count, which the entry records).
"""

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from slm_lightning.envs.spec import AtariSpec, EnvSpec
from slm_lightning.lab.baseline import (
    BASELINES_FILE,
    EPISODES,
    baseline_key,
    measure_random_return,
    today,
    write_baselines,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "slm_lightning" / "lab" / BASELINES_FILE


def config_env(path: Path) -> EnvSpec:
    """The :class:`EnvSpec` a config's ``model.init_args.env`` describes (defaults if absent)."""
    config = yaml.safe_load(path.read_text()) or {}
    env: dict[str, Any] = dict(config.get("model", {}).get("init_args", {}).get("env") or {})
    if "atari" in env:
        env["atari"] = AtariSpec(**env["atari"])
    return EnvSpec(**env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, help="default: configs/*.yaml")
    parser.add_argument("--episodes", type=int, default=EPISODES, help="episodes per env")
    args = parser.parse_args()
    configs = args.configs or sorted((ROOT / "configs").glob("*.yaml"))
    measured: dict[str, dict[str, Any]] = {}
    print(f"| config | env | key | mean return ({args.episodes} episodes) | seconds |")
    print("| --- | --- | --- | ---: | ---: |")
    for path in configs:
        spec = config_env(path)
        key = baseline_key(spec)
        seconds = "(same key)"
        if key not in measured:
            start = time.perf_counter()
            value = measure_random_return(spec, args.episodes)
            seconds = f"{time.perf_counter() - start:.1f}"
            measured[key] = {
                "env": spec.env_id,
                "return": value,
                "episodes": args.episodes,
                "measured": today(),
            }
        value = measured[key]["return"]
        print(f"| {path.stem} | {spec.env_id} | `{key}` | {value:.2f} | {seconds} |", flush=True)
    if not args.configs:
        SHIPPED.unlink(missing_ok=True)
    write_baselines(SHIPPED, measured)
    print(f"wrote {len(measured)} baselines to {SHIPPED.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
