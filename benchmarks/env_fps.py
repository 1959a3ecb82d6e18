"""Frames per second of a config's vector env alone: random actions, no policy, no updates.

Usage:
    uv run python benchmarks/env_fps.py ppo_bipedalwalker ppo_pong [--seconds 20]

Builds the env exactly as training does (``model.init_args.env`` of configs/NAME.yaml, through
``make_vector_env``: same vectorization, workers, wrappers and normalisers) and steps it with
actions sampled from its action space. The figure is the ceiling of any training run of that
config on this machine: the policy's forward passes and the updates only add to it.
"""

import argparse
import time
from pathlib import Path

import yaml

from slm_lightning.envs.atari import AtariSpec
from slm_lightning.envs.factory import make_vector_env
from slm_lightning.envs.spec import EnvSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def env_spec(config: str) -> EnvSpec:
    """The env spec of ``configs/<config>.yaml`` (its ``model.init_args.env`` section)."""
    settings = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    env = dict(settings["model"]["init_args"]["env"])
    if "atari" in env:  # a nested dataclass, which jsonargparse builds from the mapping in fit
        env["atari"] = AtariSpec(**env["atari"])
    return EnvSpec(**env)


def env_fps(spec: EnvSpec, seconds: float) -> tuple[int, float]:
    """Frames stepped and frames per second over ``seconds`` of random actions (after one
    second of warm-up: worker start, first resets)."""
    env = make_vector_env(spec, seed=0)
    try:
        env.action_space.seed(0)
        warm_end = time.perf_counter() + 1.0
        while time.perf_counter() < warm_end:
            env.step(env.action_space.sample())
        frames, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            env.step(env.action_space.sample())
            frames += env.num_envs
        return frames, frames / (time.perf_counter() - start)
    finally:
        env.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("configs", nargs="+", help="config names in configs/, without .yaml")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per config")
    args = parser.parse_args()
    print("| config | env | num_envs | frames | env-only fps |")
    print("|---|---|---:|---:|---:|")
    for config in args.configs:
        spec = env_spec(config)
        frames, fps = env_fps(spec, args.seconds)
        print(f"| {config} | {spec.name} | {spec.num_envs} | {frames} | {fps:.0f} |", flush=True)


if __name__ == "__main__":
    main()
