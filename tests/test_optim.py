"""The optimizer as a hyperparameter (``model.init_args.optimizer``): the torch class and
keyword arguments each algorithm builds, one hand-computed SGD step through ``training_step``,
the default that reproduces the Adam of before, one-line errors, and resume checks."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slm_lightning.algorithms import A2C, DQN, PPO, SAC, SARSA, CrossQ, Reinforce
from slm_lightning.cli import main
from slm_lightning.envs.factory import EnvSpec
from slm_lightning.errors import ConfigError
from slm_lightning.nets.mlp import MLPSpec
from slm_lightning.optim import OptimizerSpec
from tests.cli_helpers import instantiate
from tests.offpolicy_helpers import manual_optimization
from tests.test_callsites import onpolicy_batch

CONFIGS = Path(__file__).parents[1] / "configs"
TINY = MLPSpec([8], "tanh")
CARTPOLE = EnvSpec("CartPole-v1", num_envs=1)
PENDULUM = EnvSpec("Pendulum-v1", num_envs=1)
ERROR_LINE = re.compile(r"^\d\d:\d\d:\d\d ERROR\s+(.*)$", re.MULTILINE)
PPO_FIT = ["--config", str(CONFIGS / "ppo_cartpole.yaml"), "--model.init_args.env.num_envs=4"]
PPO_FIT += ["--model.init_args.time_horizon=32", "--metrics.log_frequency=128"]

# name -> (the spec, the keyword arguments its groups must hold)
SPECS = {
    "Adam": (
        OptimizerSpec("Adam", eps=1e-7, betas=[0.8, 0.9], weight_decay=0.1, amsgrad=True),
        {"eps": 1e-7, "betas": (0.8, 0.9), "weight_decay": 0.1, "amsgrad": True, "fused": True},
    ),
    "AdamW": (
        OptimizerSpec("AdamW", weight_decay=0.05),
        # eps is PPO's default 1e-5 (not AdamW's 1e-8), weight_decay the one given.
        {"eps": 1e-5, "weight_decay": 0.05, "betas": (0.9, 0.999), "fused": True},
    ),
    "RMSprop": (
        OptimizerSpec("RMSprop", alpha=0.9, momentum=0.5, centered=True),
        {"alpha": 0.9, "momentum": 0.5, "centered": True, "eps": 1e-5, "foreach": None},
    ),
    "SGD": (
        OptimizerSpec("SGD", momentum=0.9, nesterov=True),
        {"momentum": 0.9, "nesterov": True, "dampening": 0, "fused": None},
    ),
}


@pytest.mark.parametrize("name", SPECS)
def test_each_optimizer_has_its_class_kwargs_and_one_group_per_network(name: str) -> None:
    spec, expected = SPECS[name]
    model = PPO(CARTPOLE, actor=TINY, critic=TINY, lr=0.002, critic_lr=0.02, optimizer=spec)
    optimizer = model.configure_optimizers()
    assert type(optimizer) is getattr(torch.optim, name)
    actor, critic = optimizer.param_groups
    for group in (actor, critic):
        for key, value in expected.items():
            assert group[key] == value, key
    # The actor group holds the actor's body and head (and the Gaussian log std if any), the
    # critic group the critic's: each network trains at its own rate.
    assert {id(p) for p in actor["params"]} == {id(p) for p in model.policy.param_groups()[0]}
    assert {id(p) for p in critic["params"]} == {id(p) for p in model.policy.param_groups()[1]}
    model.rollout = SimpleNamespace(frames=0)
    model.trainer = SimpleNamespace(optimizers=[optimizer], world_size=1)
    model.on_train_epoch_start()
    assert (actor["lr"], critic["lr"]) == (0.002, 0.02)


def test_the_default_is_the_adam_of_before_bit_for_bit() -> None:
    """Adam, eps 1e-5 (PPO) / 1e-8 (DQN), torch's betas, fused; SAC's and CrossQ's Adams with
    their betas. Catches a default that picks up torch's eps or drops the fused kernel."""
    ppo = PPO(CARTPOLE, actor=TINY, critic=TINY).configure_optimizers()
    dqn = DQN(CARTPOLE, net=TINY).configure_optimizers()
    for optimizer, eps in ((ppo, 1e-5), (dqn, 1e-8)):
        assert type(optimizer) is torch.optim.Adam
        group = optimizer.param_groups[0]
        assert (group["eps"], group["betas"], group["weight_decay"]) == (eps, (0.9, 0.999), 0)
        assert group["fused"] is True and group["amsgrad"] is False
    sac = SAC(PENDULUM, actor=TINY, critic=TINY)
    crossq = CrossQ(PENDULUM, actor=TINY, critic=TINY)
    for model, betas in ((sac, (0.9, 0.999)), (crossq, (0.5, 0.999))):
        critic, policy = optimizers = (
            model.configure_optimizers()
        )  # the actor's Adam has log(alpha) as its second group
        actor, alpha = policy.param_groups
        assert all(type(o) is torch.optim.Adam for o in optimizers)
        assert critic.param_groups[0]["betas"] == actor["betas"] == betas
        # log(alpha)'s group keeps torch's betas, as before
        assert alpha["betas"] == (0.9, 0.999) and alpha["lr"] == model.alpha_lr
        assert alpha["params"] == [model.temperature.log_alpha]
        assert all(g["fused"] is True for o in optimizers for g in o.param_groups)
        assert all(g["eps"] == 1e-8 for o in optimizers for g in o.param_groups)

    # One step of the default equals one step of the Adam the code built before.
    torch.manual_seed(0)
    model = PPO(CARTPOLE, actor=TINY, critic=TINY, lr=0.01)
    reference = [p.detach().clone().requires_grad_() for p in model.parameters()]
    groups = [[reference[i] for i, _ in enumerate(model.parameters()) if id(_) in ids]
              for ids in ({id(p) for p in g} for g in model.policy.param_groups())]  # fmt: skip
    before = torch.optim.Adam([{"params": g} for g in groups], lr=0.01, eps=1e-5, fused=True)
    ours = model.configure_optimizers()
    for p, q in zip(model.parameters(), reference, strict=True):
        p.grad = torch.full_like(p, 0.3)
        q.grad = torch.full_like(q, 0.3)
    ours.step()
    before.step()
    for p, q in zip(model.parameters(), reference, strict=True):
        assert torch.equal(p.detach(), q.detach())


@pytest.mark.parametrize(
    ("cls", "env", "nets"),
    [
        (Reinforce, CARTPOLE, {"actor": TINY}),
        (A2C, CARTPOLE, {"actor": TINY, "critic": TINY}),
        (DQN, CARTPOLE, {"net": TINY}),
        (SARSA, CARTPOLE, {"net": TINY}),
        (SAC, PENDULUM, {"actor": TINY, "critic": TINY}),
        (CrossQ, PENDULUM, {"actor": TINY, "critic": TINY}),
    ],
    ids=["reinforce", "a2c", "dqn", "sarsa", "sac", "crossq"],
)
def test_every_training_algorithm_builds_the_chosen_optimizer(cls, env, nets) -> None:
    model = cls(env, **nets, optimizer=OptimizerSpec("SGD", momentum=0.5))
    optimizers = model.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    assert optimizers and all(type(o) is torch.optim.SGD for o in optimizers)
    assert all(g["momentum"] == 0.5 for o in optimizers for g in o.param_groups)


def test_sgd_step_through_training_step_moves_each_parameter_by_minus_lr_times_grad() -> None:
    """One update through training_step (backward, clipping, step) with SGD at
    lr 0.1 on a REINFORCE policy with no hidden layer: logits = W obs + b. With the
    entropy bonus off and advantages A, the loss is -mean_i A_i log pi(a_i | s_i), whose
    gradient for the bias is -mean_i A_i (onehot(a_i) - pi(s_i)) and with W and b zero
    pi = (1/2, 1/2). Two samples: actions (0, 1), advantages (1, 3):
    db = -((1) (1/2, -1/2) + (3) (-1/2, 1/2)) / 2 = -(-1, 1) / 2 = (0.5, -0.5);
    b' = b - 0.1 db = (-0.05, 0.05). Catches an optimizer that ignores the configured lr or
    takes Adam's normalised step (which would move both by 0.1)."""
    model = Reinforce(CARTPOLE, actor=MLPSpec([], "tanh"), lr=0.1, entropy_coef=0.0,
                      center_returns=False, optimizer=OptimizerSpec("SGD"))  # fmt: skip
    head = model.policy.actor_head
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    optimizer = model.configure_optimizers()
    model.rollout = SimpleNamespace(frames=0)
    # No GradScaler in the precision plugin: the loss is not scaled (32-true).
    model.trainer = SimpleNamespace(
        optimizers=[optimizer], world_size=1, precision_plugin=SimpleNamespace()
    )
    model.on_train_epoch_start()
    batch = onpolicy_batch(4, actions=[0, 1], advantages=[1.0, 3.0], returns=[1.0, 3.0],
                           log_probs=[0.0, 0.0], values=[0.0, 0.0])  # fmt: skip
    manual_optimization(model, [optimizer])
    model.training_step([batch], 0)  # a round of one minibatch
    torch.testing.assert_close(head.bias.detach(), torch.tensor([-0.05, 0.05]))
    torch.testing.assert_close(head.weight.grad, -head.weight.detach() / 0.1)  # -lr * grad


@pytest.mark.parametrize(
    ("kwargs", "line"),
    [
        ({"name": "Adamax"}, "model.init_args.optimizer.name must be one of Adam, AdamW, "
         "RMSprop, SGD, got 'Adamax'"),
        ({"name": "Adam", "momentum": 0.9}, "model.init_args.optimizer.momentum: Adam takes no "
         "momentum; it takes eps, weight_decay, betas, amsgrad"),
        ({"name": "SGD", "eps": 1e-5}, "model.init_args.optimizer.eps: SGD takes no eps; it "
         "takes weight_decay, momentum, dampening, nesterov"),
        ({"eps": 0.0}, "model.init_args.optimizer.eps must be > 0, got 0.0"),
        ({"weight_decay": -0.1}, "model.init_args.optimizer.weight_decay must be >= 0, got -0.1"),
        ({"betas": (0.9, 1.0)}, "model.init_args.optimizer.betas must be two numbers in [0, 1), "
         "got [0.9, 1.0]"),
        ({"name": "RMSprop", "alpha": 1.5}, "model.init_args.optimizer.alpha must be in [0, 1), "
         "got 1.5"),
        ({"name": "SGD", "nesterov": True}, "model.init_args.optimizer.nesterov needs momentum "
         "> 0 and dampening 0, got momentum None and dampening None"),
    ],
)  # fmt: skip
def test_bad_optimizer_settings_are_one_line_config_errors(kwargs, line) -> None:
    with pytest.raises(ConfigError) as err:
        OptimizerSpec(**kwargs)
    assert str(err.value) == line


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        ("--model.init_args.optimizer.name=Adamx", "model.init_args.optimizer.name: 'Adamx' is "
         "not allowed; choose one of Adam, AdamW, RMSprop, SGD"),
        ("--model.init_args.optimizer.momentum=0.9", "model.init_args.optimizer.momentum: Adam "
         "takes no momentum; it takes eps, weight_decay, betas, amsgrad"),
        ("--model.init_args.optimizer.decay=0.1", "model.init_args.optimizer.decay: unknown key "
         "for OptimizerSpec;"),
    ],
)  # fmt: skip
def test_bad_optimizer_on_the_command_line_is_one_line(arg, line, isolated_run, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", *PPO_FIT, f"--trainer.default_root_dir={isolated_run / 'run'}", arg])
    assert exc.value.code == 2
    errors = ERROR_LINE.findall(capsys.readouterr().err)
    assert len(errors) == 1 and errors[0].startswith(line), errors
    assert not (isolated_run / "run").exists()


def test_crossq_adam_beta1_with_an_optimizer_it_cannot_set_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"^model.init_args.adam_beta1 sets the betas of Adam"):
        CrossQ(PENDULUM, adam_beta1=0.9, optimizer=OptimizerSpec("SGD"))
    with pytest.raises(ConfigError, match=r"without model.init_args.optimizer.betas"):
        CrossQ(PENDULUM, adam_beta1=0.9, optimizer=OptimizerSpec(betas=(0.7, 0.99)))
    crossq = CrossQ(PENDULUM, actor=TINY, critic=TINY, optimizer=OptimizerSpec("AdamW"))
    assert crossq.configure_optimizers()[0].param_groups[0]["betas"] == (0.5, 0.999)


def test_optimizer_settings_from_a_config_reach_the_optimizer(isolated_run) -> None:
    cli = instantiate([*PPO_FIT, "--model.init_args.optimizer.name=AdamW",
                       "--model.init_args.optimizer.weight_decay=0.01",
                       "--model.init_args.optimizer.betas=[0.8, 0.99]"])  # fmt: skip
    optimizer = cli.model.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.01, (0.8, 0.99), 1e-5)


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory) -> Path:
    """A short PPO fit with AdamW and weight decay; its last checkpoint."""
    root = tmp_path_factory.mktemp("adamw")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setattr("sys.argv", ["slm-lab"])
        main(["fit", *PPO_FIT, f"--trainer.default_root_dir={root / 'run'}",
              "--model.init_args.max_frames=256", "--model.init_args.optimizer.name=AdamW",
              "--model.init_args.optimizer.weight_decay=0.02"])  # fmt: skip
    return root / "run" / "checkpoints" / "last.ckpt"


def test_fit_with_adamw_saves_adamw_state(adamw_run) -> None:
    ckpt = torch.load(adamw_run, weights_only=False, map_location="cpu")
    (state,) = ckpt["optimizer_states"]
    assert ckpt["hyper_parameters"]["optimizer"]["name"] == "AdamW"
    for group in state["param_groups"]:
        assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 0.02
    moments = next(iter(state["state"].values()))
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(moments)
    assert moments["step"] > 0


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ([], "was trained with AdamW; this config has model.init_args.optimizer.name=Adam: "
         "they must match to resume (or --warm_start for the weights alone)"),
        (["--model.init_args.optimizer.name=AdamW"], "was trained with AdamW weight_decay=0.02; "
         "this config gives weight_decay=0.01 (model.init_args.optimizer): they must match"),
        (["--model.init_args.optimizer.name=AdamW", "--model.init_args.optimizer.weight_decay=0.02",
          "--model.init_args.optimizer.eps=1e-8"], "was trained with AdamW eps=1e-05; this "
         "config gives eps=1e-08"),
    ],
    ids=["other-class", "other-weight-decay", "other-eps"],
)  # fmt: skip
def test_resume_with_other_optimizer_settings_is_one_line(
    adamw_run, args, line, isolated_run, capsys
) -> None:
    run = ["fit", *PPO_FIT, f"--trainer.default_root_dir={isolated_run / 'run'}"]
    with pytest.raises(SystemExit) as exc:
        main([*run, "--model.init_args.max_frames=512", f"--ckpt_path={adamw_run}", *args])
    assert exc.value.code == 2
    errors = ERROR_LINE.findall(capsys.readouterr().err)
    assert len(errors) == 1 and f"ckpt_path: {adamw_run} {line}" in errors[0], errors


def test_resume_with_the_same_optimizer_continues(adamw_run, isolated_run) -> None:
    main(["fit", *PPO_FIT, f"--trainer.default_root_dir={isolated_run / 'run'}",
          "--model.init_args.max_frames=512", f"--ckpt_path={adamw_run}",
          "--model.init_args.optimizer.name=AdamW",
          "--model.init_args.optimizer.weight_decay=0.02"])  # fmt: skip
    ckpt = torch.load(isolated_run / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["rollout"]["frames"] == 512
    (group, *_) = ckpt["optimizer_states"][0]["param_groups"]
    assert group["decoupled_weight_decay"] is True and group["weight_decay"] == 0.02


def test_a_checkpoint_from_before_the_optimizer_choice_resumes_as_adam(isolated_run, capsys):
    """A checkpoint whose hyperparameters name no optimizer was trained with Adam: the default
    resumes it; AdamW is refused."""
    first = isolated_run / "first"
    main(["fit", *PPO_FIT, f"--trainer.default_root_dir={first}",
          "--model.init_args.max_frames=256"])  # fmt: skip
    ckpt = torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)
    del ckpt["hyper_parameters"]["optimizer"]
    old = isolated_run / "old.ckpt"
    torch.save(ckpt, old)
    with pytest.raises(SystemExit):
        main(["fit", *PPO_FIT, f"--trainer.default_root_dir={isolated_run / 'other'}",
              "--model.init_args.max_frames=512", f"--ckpt_path={old}",
              "--model.init_args.optimizer.name=AdamW"])  # fmt: skip
    (line,) = ERROR_LINE.findall(capsys.readouterr().err)
    assert line.startswith(f"ckpt_path: {old} was trained with Adam; this config has ")
    main(["fit", *PPO_FIT, f"--trainer.default_root_dir={isolated_run / 'resumed'}",
          "--model.init_args.max_frames=512", f"--ckpt_path={old}"])  # fmt: skip
    resumed = torch.load(isolated_run / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["rollout"]["frames"] == 512
