"""``--torch-compile``: thunder and torch.compile give eager's numbers and eager's checkpoint keys.

Both backends run on this CPU, slower than eager (measured on a 2-core CPU, PPO CartPole,
2048 frames: eager ~11.8k fps, torch.compile ~7.4k, thunder ~0.3k), so the fits are one
rollout long.
"""

import copy
import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from slm_lightning.algorithms import SAC
from slm_lightning.cli import main
from slm_lightning.compile import compilable_blocks, compile_backend, compile_block
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import MLPSpec
from tests.cli_helpers import fit_in

ROOT = Path(__file__).parents[1]
PPO_CARTPOLE = ROOT / "configs" / "ppo_cartpole.yaml"
BACKENDS = ["thunder", "torch"]


def test_flag_values() -> None:
    assert compile_backend(True) == compile_backend("true") == "thunder"
    assert compile_backend("thunder") == "thunder"
    assert compile_backend("torch") == "torch"
    assert compile_backend(False) is compile_backend("false") is None
    with pytest.raises(ConfigError, match="torch_compile must be one of"):
        compile_backend("inductor")


def test_bad_flag_is_one_line(capfd) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(PPO_CARTPOLE), "--torch-compile=inductor"])
    assert exit_info.value.code == 2
    assert "torch_compile must be one of true, false, thunder, torch" in capfd.readouterr().err


def mlp() -> nn.Module:
    torch.manual_seed(0)
    policy = nn.Module()
    policy.body = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
    policy.head = nn.Linear(32, 2)
    return policy


@pytest.mark.parametrize("backend", BACKENDS)
def test_sac_twin_critics_compile_whole_with_their_keyword_arguments(backend, monkeypatch):
    """SAC's batched critics are one block (the actor's body another), compiled through their
    forward: the frozen pass and the training pass give eager's values and gradients, and
    the keys stay. Catches the ensemble left out of --torch-compile or its kwargs dropped."""
    if backend == "torch":  # the wiring without inductor's C++ build, as above
        compile_aot_eager = functools.partial(torch.compile, backend="aot_eager")
        monkeypatch.setattr("slm_lightning.compile.torch.compile", compile_aot_eager)
    torch.manual_seed(0)
    eager = SAC(EnvSpec("Pendulum-v1", num_envs=1), actor=MLPSpec([8]), critic=MLPSpec([8]))
    compiled = copy.deepcopy(eager)
    blocks = compilable_blocks(compiled)
    assert compiled.critic in blocks and compiled.critic_target in blocks
    assert compiled.actor.body in blocks and len(blocks) == 3
    for block in blocks:
        compile_block(block, backend)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    obs, actions = torch.randn(16, 3), torch.rand(16, 1, requires_grad=True)
    for model in (eager, compiled):
        model.critic(obs, actions, frozen=True).sum().backward()
        model.critic(obs, actions).square().sum().backward()
    torch.testing.assert_close(compiled.critic(obs, actions), eager.critic(obs, actions))
    for p_eager, p_compiled in zip(
        eager.critic.parameters(), compiled.critic.parameters(), strict=True
    ):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_block_matches_eager_and_keeps_keys(backend: str, monkeypatch) -> None:
    if backend == "torch":
        # Dynamo's capture with aot_eager: the wiring without inductor's C++ build (15-40 s
        # on this 2-core CPU); inductor runs in the slow fit test below.
        compile_aot_eager = functools.partial(torch.compile, backend="aot_eager")
        monkeypatch.setattr("slm_lightning.compile.torch.compile", compile_aot_eager)
        graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, compiled = mlp(), mlp()
    blocks = compilable_blocks(compiled)
    assert blocks == [compiled.body]  # the body; heads and nested layers stay as they are
    compile_block(compiled.body, backend)
    assert list(compiled.state_dict()) == list(eager.state_dict())

    obs = torch.randn(16, 4)
    for model in (eager, compiled):
        model.head(model.body(obs)).square().sum().backward()
    torch.testing.assert_close(compiled.body(obs), eager.body(obs))
    for p_eager, p_compiled in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad)
    # An optimizer's in-place update reaches the compiled block (it holds no copy).
    with torch.no_grad():
        compiled.body[0].weight.add_(0.5)
        eager.body[0].weight.add_(0.5)
    torch.testing.assert_close(compiled.body(obs), eager.body(obs))
    if backend == "torch":
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before


def first_row(run_dir: Path, *extra: str) -> dict[str, float]:
    """The one metrics row of a one-rollout PPO CartPole fit in ``run_dir``."""
    return fit_in(
        run_dir,
        "--model.init_args.max_frames=1024",  # one rollout: 64 envs x 16 steps, 12 updates
        "--metrics.log_frequency=1024",
        *extra,
        config=PPO_CARTPOLE,
    ).rows[0]


# thunder's fit takes ~5 s here. torch.compile's takes 20-60 s on this 2-core CPU: inductor
# builds C++ kernels for the training graph, its backward, and again for the rollout's
# inference-mode and batch-size variants; the block test above covers it by default.
FIT_BACKENDS = ["thunder", pytest.param("torch", marks=pytest.mark.slow)]


@pytest.mark.parametrize("backend", FIT_BACKENDS)
def test_compiled_fit_matches_eager(backend: str, tmp_path: Path, capfd) -> None:
    eager = first_row(tmp_path / "eager")
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    flag = "--torch-compile=true" if backend == "thunder" else "--torch_compile=torch"
    compiled = first_row(tmp_path / backend, flag)
    err = capfd.readouterr().err
    assert f"torch_compile: {backend} compiled 2 network blocks" in err  # actor and critic bodies
    assert "expected" in err or "expect it to be slower" in err  # the CPU warning
    if backend == "torch":
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs_before

    # Same rollout, same 12 updates: the logged loss and returns agree with eager.
    for key in ("train/loss", "train/value_loss", "train/entropy"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    assert compiled["episode/return_ma"] == eager["episode/return_ma"]

    # Checkpoints keep eager's keys: a compiled run's weights load into an eager model.
    def state(run: str) -> dict[str, torch.Tensor]:
        path = tmp_path / run / "checkpoints" / "last.ckpt"
        return torch.load(path, weights_only=False)["state_dict"]

    eager_state, compiled_state = state("eager"), state(backend)
    assert list(compiled_state) == list(eager_state)
    for key, value in compiled_state.items():
        torch.testing.assert_close(value, eager_state[key], rtol=1e-4, atol=1e-5)
