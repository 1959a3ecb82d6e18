"""SAC and CrossQ: target entropies, the squashed log-probability, the critic target by hand,
CrossQ's batch-norm modes and joint pass, checkpoint round trip, and short runs."""

import inspect
import math
import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.distributions import Normal, TanhTransform, TransformedDistribution

from slm_lightning.algorithms import SAC, CrossQ
from slm_lightning.algorithms.base import direct_steps_possible
from slm_lightning.algorithms.sac import (
    alpha_loss,
    default_target_entropy,
    sac_actor_loss,
    sac_critic_target,
    twin_critic_loss,
)
from slm_lightning.callbacks import MetricsTracker
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.nets.mlp import MLPSpec, mlp_body, orthogonal_init
from slm_lightning.nets.sac_nets import (
    BatchRenorm,
    BatchRenormSpec,
    SquashedGaussianActor,
    TwinQ,
    tanh_log_det,
)
from tests.offpolicy_helpers import CountBackwards

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = MLPSpec([16, 16], "relu")
PENDULUM_BOX = spaces.Box(-2.0, 2.0, (1,), np.float32)
PENDULUM_OBS = spaces.Box(-8.0, 8.0, (3,), np.float32)


SHORT = [  # 600 frames of one env, one update per frame from frame 200 on, tiny nets
    "--model.init_args.max_frames=600",
    "--model.init_args.env.num_envs=1",
    "--model.init_args.training_frequency=1",
    "--model.init_args.updates_per_step=1",
    "--model.init_args.learning_starts=200",
    "--model.init_args.batch_size=32",
    "--model.init_args.actor.hidden_sizes=[16,16]",
    "--model.init_args.critic.hidden_sizes=[16,16]",
    "--metrics.log_frequency=200",
]


# --- target entropy ------------------------------------------------------------------------


def test_default_target_entropy() -> None:
    # -dim(A) for Box actions (Haarnoja et al. 2018b); 0.98 log|A| for Discrete (Christodoulou).
    assert default_target_entropy(PENDULUM_BOX) == -1.0
    assert default_target_entropy(spaces.Box(-1, 1, (2, 3))) == -6.0
    assert default_target_entropy(spaces.Discrete(4)) == pytest.approx(0.98 * math.log(4))
    assert default_target_entropy(spaces.Discrete(2)) < math.log(2)  # reachable: below uniform

    cartpole = SAC(EnvSpec("CartPole-v1", num_envs=1), actor=TINY, critic=TINY)
    assert cartpole.temperature.target_entropy == pytest.approx(0.98 * math.log(2))
    pendulum = SAC(EnvSpec("Pendulum-v1", num_envs=1), actor=TINY, critic=TINY)
    assert pendulum.temperature.target_entropy == -1.0
    assert pendulum.temperature.auto and float(pendulum.temperature.alpha) == pytest.approx(1.0)
    fixed = SAC(EnvSpec("Pendulum-v1", num_envs=1), alpha=0.2, target_entropy=-3.0, critic=TINY)
    assert not fixed.temperature.auto and not fixed.temperature.log_alpha.requires_grad
    assert float(fixed.temperature.alpha) == pytest.approx(0.2)
    assert fixed.temperature.target_entropy == -3.0


# --- the squashed Gaussian --------------------------------------------------------------------


def test_tanh_log_det_is_stable() -> None:
    u = torch.tensor([-30.0, -12.0, -3.0, -0.5, 0.0, 0.7, 4.0, 12.0, 30.0])
    naive = torch.log(1 - torch.tanh(u.double()) ** 2)
    moderate = u.abs() < 5
    torch.testing.assert_close(tanh_log_det(u)[moderate].double(), naive[moderate])
    assert torch.isfinite(tanh_log_det(u)).all()  # float32 tanh(12) rounds to 1: naive is -inf
    assert torch.isinf(torch.log(1 - torch.tanh(u) ** 2)[u.abs() >= 12]).all()
    # Asymptotically log(1 - tanh(u)^2) = log 4 - 2|u|.
    torch.testing.assert_close(tanh_log_det(torch.tensor(30.0)), torch.tensor(math.log(4) - 60))


def test_squashed_log_prob_matches_transformed_distribution() -> None:
    torch.manual_seed(0)
    actor = SquashedGaussianActor(PENDULUM_OBS, spaces.Box(-1, 1, (3,)), TINY)
    with torch.no_grad():  # a spread of means and stds, so that some |u| are large
        actor.mean.weight.normal_(0.0, 2.0)
        actor.log_std.weight.normal_(0.0, 1.0)
    obs = torch.randn(64, 3) * 3
    torch.manual_seed(1)
    sample = actor.evaluate(obs)
    mean, log_std = actor(obs)
    torch.manual_seed(1)  # the same noise: evaluate draws it once, with randn_like
    u = mean + log_std.exp() * torch.randn_like(mean)

    tanh = TanhTransform(cache_size=1)  # caches u, so log_prob does not invert tanh
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [tanh])
    expected = dist.log_prob(tanh(u)).sum(-1)
    torch.testing.assert_close(sample.log_probs, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sample.actions, torch.tanh(u))
    assert sample.log_probs.shape == (64,) and (sample.actions.abs() <= 1).all()
    assert log_std.min() >= -5 and log_std.max() <= 2  # clamped
    assert sample.log_probs.requires_grad  # reparameterised: the actor loss differentiates it


def test_env_actions_rescale_to_box() -> None:
    actor = SquashedGaussianActor(PENDULUM_OBS, PENDULUM_BOX, TINY)
    unit = np.array([[-1.0], [0.0], [0.5], [1.0], [1.2]], dtype=np.float32)
    np.testing.assert_allclose(actor.env_actions(unit), [[-2.0], [0.0], [1.0], [2.0], [2.0]])
    greedy = actor.greedy(torch.randn(32, 3) * 5)
    assert (greedy.abs() <= 1).all()


# --- losses by hand -------------------------------------------------------------------------


def test_critic_target_continuous_by_hand() -> None:
    # Transition 0 continues (discount 0.9, from a 1-step window); 1 is terminal; 2 is a
    # 2-step window that was truncated (gamma^2 = 0.81), so it still bootstraps.
    next_q = torch.tensor([1.0, 2.0, -3.0])
    next_log_probs = torch.tensor([-0.5, 0.3, 1.0])
    rewards = torch.tensor([1.0, -1.0, 0.5])
    discounts = torch.tensor([0.9, 0.9, 0.81])
    terminated = torch.tensor([0.0, 1.0, 0.0])
    alpha = 0.2
    target = sac_critic_target(next_q, next_log_probs, rewards, discounts, terminated, alpha)
    expected = [1 + 0.9 * (1.0 + 0.2 * 0.5), -1.0, 0.5 + 0.81 * (-3.0 - 0.2 * 1.0)]
    torch.testing.assert_close(target, torch.tensor(expected))


def test_critic_target_discrete_takes_the_expectation() -> None:
    probs = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    next_q = torch.tensor([[1.0, 3.0], [10.0, -10.0]])
    rewards, discounts = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.5])
    terminated = torch.tensor([0.0, 1.0])
    alpha = 0.5
    target = sac_critic_target(
        next_q, probs.log(), rewards, discounts, terminated, alpha, next_probs=probs
    )
    value = 0.25 * (1 - 0.5 * math.log(0.25)) + 0.75 * (3 - 0.5 * math.log(0.75))
    torch.testing.assert_close(target, torch.tensor([1 + 0.5 * value, 2.0]))


def test_actor_and_alpha_losses_by_hand() -> None:
    q, log_probs = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 0.5])
    loss = sac_actor_loss(q, log_probs, 0.1)  # mean(alpha log pi - Q)
    torch.testing.assert_close(loss, torch.tensor(((-0.1 - 2.0) + (0.05 + 1.0)) / 2))
    probs = torch.tensor([[0.2, 0.8]])
    loss = sac_actor_loss(torch.tensor([[1.0, 2.0]]), probs.log(), 0.5, probs)
    expected = 0.2 * (0.5 * math.log(0.2) - 1.0) + 0.8 * (0.5 * math.log(0.8) - 2.0)
    torch.testing.assert_close(loss, torch.tensor(expected))
    # Entropy above the target: the gradient step lowers log(alpha); below it, raises it.
    log_alpha = torch.tensor(0.0, requires_grad=True)
    alpha_loss(log_alpha, torch.tensor([1.0, 2.0]), target_entropy=0.5).backward()
    assert log_alpha.grad == pytest.approx(1.0)  # mean(H) - H_target
    torch.testing.assert_close(
        twin_critic_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([0.0, 0.0])),
        torch.tensor(0.5 * 2.5 + 0.0),
    )


def test_discrete_twin_q_gathers_taken_actions() -> None:
    critic = TwinQ(PENDULUM_OBS, spaces.Discrete(3), TINY)
    obs, actions = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    q_all = critic(obs)
    assert q_all.shape == (2, 5, 3)
    torch.testing.assert_close(critic.taken(obs, actions), q_all[:, torch.arange(5), actions])
    assert not torch.equal(q_all[0], q_all[1])  # independently initialised critics


# --- Batch Renormalization and CrossQ -------------------------------------------------------


def test_batch_renorm_warmup_is_batch_norm_then_clips() -> None:
    torch.manual_seed(0)
    layer = BatchRenorm(1, 4, BatchRenormSpec(momentum=0.1, warmup_steps=2, eps=1e-3))
    x = torch.randn(32, 4) * 3 + 1
    expected = F.batch_norm(x, None, None, training=True, eps=1e-3)
    torch.testing.assert_close(layer(x[None], batch_stats=True)[0], expected)  # r = 1, d = 0
    layer(x[None], batch_stats=True)
    assert [float(v) for v in layer.limits()] == [3.0, 5.0]  # warmed up: the paper's limits
    # Running stats are far from the batch's (mean 1 vs running ~0.2): r and d now correct.
    y = layer(x[None] + 100.0, batch_stats=True)[0]
    assert torch.allclose(y.mean(0), torch.full((4,), 5.0))  # d clipped at d_max
    running = (x - layer.running_mean[0]) / (layer.running_var[0] + 1e-3).sqrt()
    before = layer.running_mean.clone()
    torch.testing.assert_close(layer(x[None], batch_stats=False)[0], running)
    assert torch.equal(layer.running_mean, before)  # the running statistics are only read


def test_batch_renorm_keeps_each_critics_statistics_apart() -> None:
    """Two critics' features of different scales: each member normalises with its own batch
    statistics and keeps its own running ones. Catches statistics taken over the members
    axis (mixing the critics) instead of the batch axis."""
    layer = BatchRenorm(2, 3, BatchRenormSpec(momentum=0.5, eps=1e-3))
    x = torch.stack([torch.randn(64, 3), 10.0 * torch.randn(64, 3) + 4.0])
    y = layer(x, batch_stats=True)
    for member in range(2):
        expected = F.batch_norm(x[member], None, None, training=True, eps=1e-3)
        torch.testing.assert_close(y[member], expected)
        torch.testing.assert_close(layer.running_mean[member, 0], 0.5 * x[member].mean(0))


def test_twin_q_is_each_critic_as_its_own_mlp() -> None:
    """The ensemble's critic ``i`` computes and is initialised as critic ``i`` built as its own
    MLP (Linear layers drawn critic by critic, orthogonal, output gain 1). Catches a weight
    stored untransposed, members' layers interleaved, or the activation skipped."""
    spec = MLPSpec([16, 8], "tanh")
    torch.manual_seed(3)
    ensemble = TwinQ(PENDULUM_OBS, PENDULUM_BOX, spec)
    torch.manual_seed(3)
    mlps = []
    for _ in range(2):
        body, width = mlp_body(4, spec)
        mlps.append(nn.Sequential(*body, orthogonal_init(nn.Linear(width, 1), 1.0)))
    obs, actions = torch.randn(5, 3), torch.rand(5, 1)
    expected = torch.stack([mlp(torch.cat([obs, actions], -1)).squeeze(-1) for mlp in mlps])
    torch.testing.assert_close(ensemble(obs, actions), expected)
    # Frozen: the same values, gradients to the actions and none to the critics.
    actions.requires_grad_(True)
    ensemble(obs, actions, frozen=True).sum().backward()
    assert actions.grad is not None and actions.grad.abs().sum() > 0
    assert all(p.grad is None for p in ensemble.parameters())


def crossq_model(**overrides) -> CrossQ:
    kwargs = dict(
        max_frames=300, learning_starts=200, batch_size=16, policy_delay=1, actor=TINY, critic=TINY
    )
    return CrossQ(EnvSpec("Pendulum-v1", num_envs=1), **{**kwargs, **overrides})


def quiet_trainer() -> L.Trainer:
    return L.Trainer(
        max_epochs=-1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def test_crossq_joint_pass_with_batch_statistics_actor_update_with_running_ones() -> None:
    torch.manual_seed(0)
    model = crossq_model()
    renorms = [m for m in model.critic.modules() if isinstance(m, BatchRenorm)]
    assert len(renorms) == 3  # input + after each of two hidden layers, both critics in each
    calls: list[dict] = []

    def before(module, args, kwargs):
        calls.append({"running": [m.running_mean.clone() for m in renorms]})

    def after(module, args, kwargs, output):
        batch_stats = kwargs.get("batch_stats")
        calls[-1].update(
            rows=len(args[0]),
            batch_stats=module.training if batch_stats is None else batch_stats,
            frozen=kwargs.get("frozen", False),
            grad=output.requires_grad,
            changed=any(
                not torch.equal(m.running_mean, old)
                for m, old in zip(renorms, calls[-1]["running"], strict=True)
            ),
        )

    model.critic.register_forward_pre_hook(before, with_kwargs=True)
    model.critic.register_forward_hook(after, with_kwargs=True)
    quiet_trainer().fit(model)

    updates = model.critic_updates
    assert updates == 300 - 200 + 1  # one batch per frame from learning_starts on
    assert len(calls) == 2 * updates  # per update: one joint critic pass, one actor pass
    critic_passes, actor_passes = calls[0::2], calls[1::2]
    for call in critic_passes:  # current and next pairs together: 2 x batch_size rows
        assert call["rows"] == 2 * 16 and call["batch_stats"] and not call["frozen"]
        assert call["changed"] and call["grad"]
    for call in actor_passes:  # running statistics used, not updated; critics frozen
        assert call["rows"] == 16 and not call["batch_stats"] and call["frozen"]
        assert not call["changed"]
    assert model.critic.training  # left in train mode
    assert int(renorms[0].steps) == updates


# --- checkpoints and runs -------------------------------------------------------------------


def optimizer_states_equal(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or set(a["state"]) != set(b["state"]):
        return False
    return all(
        torch.equal(a["state"][i][name], value)
        for i, state in b["state"].items()
        for name, value in state.items()
    )


def test_sac_checkpoint_round_trip(tmp_path: Path, run_fit) -> None:
    first = run_fit(
        *SHORT, "--model.init_args.policy_delay=2", config=CONFIGS / "sac_pendulum.yaml"
    )
    trained, trainer = first.model, first.trainer
    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
    # The critics' optimizer, and the actor's with log_alpha as its second group.
    assert len(ckpt["optimizer_states"]) == len(trainer.optimizers) == 2
    assert [len(g["params"]) for g in ckpt["optimizer_states"][1]["param_groups"]] == [8, 1]
    for saved, optimizer in zip(ckpt["optimizer_states"], trainer.optimizers, strict=True):
        assert optimizer_states_equal(saved, optimizer.state_dict())
    log_alpha = ckpt["state_dict"]["temperature.log_alpha"]
    assert torch.equal(log_alpha, trained.temperature.log_alpha.detach())
    assert log_alpha != 0.0  # tuned away from the initial alpha = 1
    assert ckpt["state_dict"]["critic_target.weights.0"].shape == (2, 4, 16)  # 2 critics, (s, a)
    assert ckpt["critic_updates"] == trained.critic_updates == 401

    # Resuming (with the budget spent) restores every optimizer, log_alpha and the counters.
    resumed = run_fit(
        *SHORT, f"--ckpt_path={ckpt_path}", config=CONFIGS / "sac_pendulum.yaml", run_dir="again"
    )
    for saved, optimizer in zip(ckpt["optimizer_states"], resumed.trainer.optimizers, strict=True):
        assert optimizer_states_equal(saved, optimizer.state_dict())
    for key, tensor in resumed.model.state_dict().items():
        assert torch.equal(ckpt["state_dict"][key], tensor), key
    assert resumed.model.critic_updates == 401
    assert resumed.trainer.global_step == ckpt["global_step"]

    loaded = SAC.load_from_checkpoint(ckpt_path, weights_only=False, map_location="cpu")
    obs = torch.randn(64, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval_actions(obs, True), trained.eval_actions(obs, True))


@pytest.mark.parametrize(
    ("config", "env_actions"), [("sac_pendulum.yaml", "box"), ("sac_cartpole.yaml", "discrete")]
)
def test_sac_short_run_completes(config: str, env_actions: str, run_fit) -> None:
    run = run_fit(*SHORT, "--model.init_args.policy_delay=2", config=CONFIGS / config)
    cli, model, summary = run.cli, run.model, run.summary
    assert summary["frames"] == 600 and summary["episodes"] > 0
    # One critic step per frame from learning_starts; every second one an actor step, which
    # steps alpha too (one optimizer).
    assert model.critic_updates == 401
    assert cli.trainer.global_step == 401 + 401 // 2
    for key in ["critic_loss", "actor_loss", "alpha", "entropy", "q_mean"]:
        assert math.isfinite(float(model.train_metrics[f"train/{key}"])), key
    # The entropy starts above its target: alpha falls from its initial value.
    assert float(model.temperature.alpha) < model.hparams.initial_alpha
    obs = torch.as_tensor(np.stack([model.observation_space.sample() for _ in range(32)]))
    with torch.no_grad():
        actions = model.env_actions(model.eval_actions(obs, greedy=False).numpy())
    assert model.action_space.contains(actions[0])
    assert all(model.action_space.contains(a) for a in actions)


@pytest.mark.parametrize("config", ["sac_pendulum.yaml", "crossq_pendulum.yaml"])
def test_sac_and_crossq_train_under_bf16_mixed_acting_in_float32(config: str, run_fit) -> None:
    """``--trainer.precision=bf16-mixed``: a round's env steps run inside training_step, under
    Lightning's autocast; the actor must act in float32 there (numpy takes no bfloat16), and
    CrossQ's batch renormalisation must keep float32 statistics. Catches acting under
    autocast (TypeError at the first round past learning_starts) and bfloat16 batch
    statistics lerped into the float32 running ones (RuntimeError)."""
    run = run_fit(*SHORT, "--trainer.precision=bf16-mixed", config=CONFIGS / config)
    assert run.summary["frames"] == 600 and run.model.critic_updates == 401
    stored = run.model.memory.actions[: len(run.model.memory)]
    assert stored.dtype == np.float32 and np.isfinite(stored).all()
    assert math.isfinite(float(run.model.train_metrics["train/critic_loss"]))


def test_crossq_short_run_completes(run_fit) -> None:
    cli = run_fit(*SHORT, config=CONFIGS / "crossq_pendulum.yaml").cli
    assert cli.model.critic_updates == 401
    assert cli.trainer.global_step == 401 + 401 // 3  # policy delay 3; actor and alpha together
    assert "critic_target" not in dict(cli.model.named_children())


def documented_args(cls: type) -> set[str]:
    doc = inspect.getdoc(cls).split("Args:\n", 1)[1]
    return set(re.findall(r"^    (\w+): ", doc, re.MULTILINE))


@pytest.mark.parametrize("cls", [SAC, CrossQ], ids=lambda c: c.__name__)
def test_every_argument_documented(cls: type) -> None:
    params = {p for p in inspect.signature(cls.__init__).parameters if p != "self"}
    assert documented_args(cls) == params


@pytest.mark.slow
def test_sac_learns_pendulum(run_fit) -> None:
    # Seed 0: random play scores ~-1200 a episode; by 6k frames single episodes are ~-150.
    cli = run_fit("--model.init_args.max_frames=6000", config=CONFIGS / "sac_pendulum.yaml").cli
    tracker = next(cb for cb in cli.trainer.callbacks if isinstance(cb, MetricsTracker))
    returns = tracker.history["returns"]
    assert len(returns) == 29  # 201 frames an episode: NEXT_STEP autoreset spends one
    first, last = np.mean(returns[:5]), np.mean(returns[-5:])
    assert first < -900 and last > -400, returns


def test_direct_steps_train_as_lightnings_dispatch_does_and_give_way_to_hooks(run_fit) -> None:
    """The same short SAC run twice: with no hook to dispatch, updates skip Lightning's
    dispatch; with a callback's on_after_backward, they go through it (the hook runs after
    every backward: 401 critic and 200 actor ones). Both train bit for bit alike and count
    the same global_step. Catches the direct path skipping a step or the step counting,
    and hooks silently skipped."""
    args = (*SHORT, "--model.init_args.policy_delay=2")
    direct = run_fit(*args, config=CONFIGS / "sac_pendulum.yaml", run_dir="direct")
    hooked = run_fit(
        *args,
        "--trainer.callbacks+=tests.offpolicy_helpers.CountBackwards",
        config=CONFIGS / "sac_pendulum.yaml",
        run_dir="hooked",
    )
    assert direct.model._direct_steps and not hooked.model._direct_steps
    (counter,) = [c for c in hooked.cli.trainer.callbacks if isinstance(c, CountBackwards)]
    assert counter.backwards == 401 + 200
    assert direct.cli.trainer.global_step == hooked.cli.trainer.global_step == 401 + 200
    for (key, ours), theirs in zip(
        direct.model.state_dict().items(), hooked.model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), key


def test_direct_steps_need_one_device_full_precision_and_no_step_hooks() -> None:
    trainer = SimpleNamespace(
        strategy=SingleDeviceStrategy("cpu"), precision_plugin=Precision(), callbacks=[]
    )
    model = crossq_model()
    assert direct_steps_possible(trainer, model)
    assert not direct_steps_possible(
        SimpleNamespace(**{**vars(trainer), "callbacks": [CountBackwards()]}), model
    )
    assert not direct_steps_possible(
        SimpleNamespace(
            **{**vars(trainer), "precision_plugin": MixedPrecision("bf16-mixed", "cpu")}
        ),
        model,
    )
    assert not direct_steps_possible(
        SimpleNamespace(**{**vars(trainer), "strategy": DDPStrategy()}), model
    )
