"""Stable-Baselines3's side of ``benchmarks/peers.py``: one SB3 training run, timed.

Runs in SB3's own virtual environment, never in ours (set-up in ``peers.py``'s docstring);
``peers.py`` calls it with the keyword arguments it derives from a case's settings:
    "$PEERS/sb3/bin/python" benchmarks/peers_sb3.py --algo sac --env Pendulum-v1 \\
        --frames 30000 --target -200 --kwargs '{"learning_rate": 0.001, ...}'
or with ``--zoo``, RL Zoo's tuned hyperparameters for (algo, env), applied as rl_zoo3's
ExperimentManager does for the keys CartPole's entries use (``n_envs``, ``lin_X``
schedules, ``policy_kwargs`` as Python source).

torch runs on one thread. A callback records each finished episode (SB3's frame counter,
seconds since ``learn`` began, the Monitor's return), and the last line printed is
``peers.result_line`` of the figures ``peers.py`` reads: frames, seconds, return_ma,
frames_to_target, seconds_to_target (episode statistics counted by ``peers.episode_stats``,
as ours are).
"""

import argparse
import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import rl_zoo3
import stable_baselines3
import torch
import yaml

# This script's folder is sys.path[0]: peers.py is importable and imports only the stdlib.
from peers import episode_stats, result_line
from rl_zoo3.utils import linear_schedule
from stable_baselines3 import DQN, PPO, SAC
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

ALGOS: dict[str, type[BaseAlgorithm]] = {"sac": SAC, "dqn": DQN, "ppo": PPO}
ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "elu": torch.nn.ELU}


class EpisodeRecorder(BaseCallback):
    """Records ``(frame, seconds, return)`` of every finished episode (Monitor's ``episode``)."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: list[tuple[int, float, float]] = []
        self.t0 = time.perf_counter()

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if (episode := info.get("episode")) is not None:
                now = time.perf_counter() - self.t0
                self.episodes.append((self.num_timesteps, now, float(episode["r"])))
        return True


def zoo_hyperparams(algo: str, env_id: str) -> dict[str, Any]:
    """RL Zoo's hyperparameters for (algo, env), as SB3 keyword arguments plus ``n_envs`` and
    ``n_timesteps``.

    Args:
        algo: ``ppo``, ``dqn`` …, the name of rl_zoo3's ``hyperparams/<algo>.yml``.
        env_id: the gymnasium id, a key of that file.
    """
    path = Path(rl_zoo3.__file__).parent / "hyperparams" / f"{algo}.yml"
    table = yaml.safe_load(path.read_text())
    if env_id not in table:
        raise SystemExit(f"--env: rl_zoo3 has no {algo} hyperparameters for {env_id}")
    hp = dict(table[env_id])
    if "normalize" in hp or "env_wrapper" in hp:
        raise SystemExit(f"--zoo: {algo} {env_id} wraps its env; only plain envs are supported")
    hp.pop("policy", None)
    for key in ("learning_rate", "clip_range"):
        if isinstance(hp.get(key), str) and hp[key].startswith("lin_"):
            hp[key] = linear_schedule(float(hp[key].removeprefix("lin_")))
    if isinstance(hp.get("policy_kwargs"), str):
        # The zoo stores them as Python source, e.g. "dict(net_arch=[256, 256])".
        hp["policy_kwargs"] = eval(hp["policy_kwargs"], {"dict": dict, "nn": torch.nn})
    return hp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--algo", required=True, choices=sorted(ALGOS))
    parser.add_argument("--env", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=0, help="frame budget; 0: the zoo's")
    parser.add_argument("--target", type=float, default=None)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--kwargs", type=json.loads, help="SB3 keyword arguments as JSON")
    source.add_argument("--zoo", action="store_true", help="RL Zoo's tuned hyperparameters")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.zoo:
        hp = zoo_hyperparams(args.algo, args.env)
        n_envs, budget = int(hp.pop("n_envs", 1)), int(hp.pop("n_timesteps"))
    else:
        hp, n_envs, budget = dict(args.kwargs), 1, 0
        policy_kwargs = hp.get("policy_kwargs", {})
        if "activation_fn" in policy_kwargs:
            policy_kwargs["activation_fn"] = ACTIVATIONS[policy_kwargs["activation_fn"]]
    frames = args.frames or budget
    if frames < 1:
        raise SystemExit("--frames must be >= 1 without --zoo")

    env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed)
    model = ALGOS[args.algo]("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **hp)
    recorder = EpisodeRecorder()
    recorder.t0 = start = time.perf_counter()
    model.learn(total_timesteps=frames, callback=recorder)
    seconds = time.perf_counter() - start
    env.close()

    stats = episode_stats(recorder.episodes, args.target)
    print(
        f"sb3 {stable_baselines3.__version__} rl_zoo3 {rl_zoo3.__version__} torch "
        f"{torch.__version__} gymnasium {gym.__version__} threads {torch.get_num_threads()} "
        f"n_envs {n_envs} hyperparameters {hp}",
        flush=True,
    )
    figures = {
        "peer": "sb3",
        "algo": args.algo,
        "env": args.env,
        "seed": args.seed,
        "frames": int(model.num_timesteps),
        "seconds": round(seconds, 3),
        "fps": round(model.num_timesteps / seconds),
        "episodes": stats["episodes"],
        "return_ma": None if stats["return_ma"] is None else round(stats["return_ma"], 3),
        "frames_to_target": stats["frames_to_target"],
        "seconds_to_target": (
            None if stats["seconds_to_target"] is None else round(stats["seconds_to_target"], 3)
        ),
    }
    print(result_line(figures), flush=True)


if __name__ == "__main__":
    main()
