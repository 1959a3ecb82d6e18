"""``agent.algorithm`` and ``agent.memory`` of each family onto our algorithm's arguments:
the policy-gradient family (PPO, A2C, REINFORCE) and Q-learning (DQN variants, SARSA); the
soft actor-critics are in ``soft_actor_critic.py``."""

import dataclasses
from typing import Any

from slm_lightning.errors import ConfigError
from slm_lightning.lab.specs import nets
from slm_lightning.lab.specs.nets import ARGS, TORCH_EPS
from slm_lightning.lab.specs.report import SpecKeys, show

ALG = "agent.algorithm"
MEM = "agent.memory"
NET = "agent.net"

# SLM Lab algorithm name -> (our class, family, arguments the name implies).
ALGORITHMS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "PPO": ("PPO", "pg", {}),
    "ActorCritic": ("A2C", "pg", {}),
    "Reinforce": ("Reinforce", "pg", {}),
    "DQN": ("DQN", "dqn", {"double": False}),
    "DoubleDQN": ("DQN", "dqn", {"double": True}),
    "VanillaDQN": ("DQN", "dqn", {"double": False, "tau": 1.0}),
    "SARSA": ("SARSA", "sarsa", {}),
    "SoftActorCritic": ("SAC", "sac", {}),
    "SAC": ("SAC", "sac", {}),
    "CrossQ": ("CrossQ", "sac", {}),
    "Random": ("RandomAgent", "random", {}),
}
REFUSED = ("SIL", "PPOSIL", "SoftActorCriticSIL", "HydraDQN", "MultitaskDQN")


@dataclasses.dataclass
class Target:
    """What the mapping of one spec needs to know about where it is going.

    Args:
        cls: our algorithm class name.
        family: ``pg``, ``dqn``, ``sarsa``, ``sac`` or ``random``.
        num_envs: the spec's env.num_envs (1 when absent).
        max_frames: the spec's env.max_frame.
        max_episode_steps: the env's time limit (REINFORCE's episodic memory).
    """

    cls: str
    family: str
    num_envs: int
    max_frames: int
    max_episode_steps: int | None


def target_of(keys: SpecKeys) -> tuple[str, str]:
    """Our class and family for ``agent.algorithm.name``; a one-line refusal otherwise."""
    name = keys.get(f"{ALG}.name")
    if name in REFUSED or (isinstance(name, str) and "SIL" in name):
        raise ConfigError(
            f"{ALG}.name {name}: self-imitation learning is not supported; "
            f"supported: {', '.join(ALGORITHMS)}"
        )
    if name not in ALGORITHMS:
        raise ConfigError(f"{ALG}.name {name}: not supported; supported: {', '.join(ALGORITHMS)}")
    cls, family, implied = ALGORITHMS[name]
    line = f"model.class_path slm_lightning.algorithms.{cls}"
    if implied:
        line += ", " + ", ".join(f"{ARGS}.{k} {show(v)}" for k, v in implied.items())
    keys.converted(
        f"{ALG}.name",
        line,
        {"model.class_path": f"slm_lightning.algorithms.{cls}"}
        | {f"{ARGS}.{k}": v for k, v in implied.items()},
    )
    if name == "VanillaDQN":
        keys.note("VanillaDQN has no target network; tau 1.0 copies the online net every update")
    return cls, family


def simple(keys: SpecKeys, pairs: dict[str, str]) -> None:
    """Claim each unclaimed spec key as exact into ``model.init_args.<target>``."""
    for source, target in pairs.items():
        if keys.unclaimed(source):
            keys.exact(source, f"{ARGS}.{target}")


def _lr_and_optimizer(keys: SpecKeys, t: Target, eps: float | None) -> None:
    """``optim_spec`` / ``actor_optim_spec`` / ``critic_optim_spec`` / ``use_same_optim`` and
    the lr schedule, for algorithms with ``lr`` and (policy gradients) ``critic_lr``."""
    actor = (
        f"{NET}.actor_optim_spec" if keys.has(f"{NET}.actor_optim_spec") else f"{NET}.optim_spec"
    )
    if not keys.has(actor):
        return
    lr = nets.optimizer(keys, actor, eps)
    if keys.has(f"{actor}.lr"):
        keys.exact(f"{actor}.lr", f"{ARGS}.lr")
    nets.lr_schedule(keys, lr, f"{ARGS}.lr", t.max_frames)
    critic = f"{NET}.critic_optim_spec"
    shared = bool(keys.get(f"{NET}.shared"))
    same = bool(keys.get(f"{NET}.use_same_optim"))
    if keys.has(f"{NET}.use_same_optim"):
        if same or shared:
            keys.converted(
                f"{NET}.use_same_optim",
                f"{ARGS}.critic_lr null (the critic follows lr)",
                {f"{ARGS}.critic_lr": None},
            )
        else:
            keys.converted(
                f"{NET}.use_same_optim", "(implicit: the critic has its own learning rate)"
            )
    if keys.has(critic):
        if same or shared or t.family != "pg":
            why = "shared net" if shared else "use_same_optim" if same else "one optimizer"
            for leaf in list(keys.leaves):
                if leaf.startswith(f"{critic}.") and leaf not in keys.claimed:
                    keys.converted(leaf, f"(unused: {why}, as upstream)")
            return
        for leaf in list(keys.leaves):
            if not leaf.startswith(f"{critic}.") or leaf in keys.claimed:
                continue
            field = leaf.rsplit(".", 1)[1]
            if field == "lr":
                lr_c = keys.get(leaf)
                value: Any = lr_c
                sched = keys.config.get("model", {}).get("init_args", {}).get("lr")
                if isinstance(sched, dict) and lr_c is not None:
                    value = {**sched, "start": lr_c}
                    if "kind" in sched and lr and lr_c:
                        value["end"] = sched["end"] * lr_c / lr
                keys.converted(
                    leaf, f"{ARGS}.critic_lr {show(value)}", {f"{ARGS}.critic_lr": value}
                )
            elif keys.get(leaf) == keys.get(f"{actor}.{field}"):
                keys.converted(leaf, f"{ARGS}.optimizer.{field} (the same as the actor's)")
            else:
                keys.unsupported(
                    leaf, "one optimizer trains actor and critic here; only its lr differs"
                )


def policy_gradient(keys: SpecKeys, t: Target) -> None:
    """PPO, A2C, REINFORCE."""
    nets.pdtype_and_policy(keys, exploration=False)
    if keys.has(f"{ALG}.explore_var_spec"):
        if keys.get(f"{ALG}.explore_var_spec") is None:
            keys.converted(f"{ALG}.explore_var_spec", "(none: the policy explores by sampling)")
        else:
            keys.unsupported(
                f"{ALG}.explore_var_spec", "policy gradients here explore by sampling only"
            )
    simple(keys, {f"{ALG}.gamma": "gamma"})
    if keys.has(f"{ALG}.entropy_coef_spec"):
        nets.schedule(keys, f"{ALG}.entropy_coef_spec", f"{ARGS}.entropy_coef")
    if t.cls == "PPO":
        simple(keys, {f"{ALG}.lam": "gae_lambda", f"{ALG}.training_epoch": "training_epochs"})
        if keys.has(f"{ALG}.clip_eps_spec"):
            nets.schedule(keys, f"{ALG}.clip_eps_spec", f"{ARGS}.clip_eps")
    if t.cls == "A2C":
        lam, nstep = keys.get(f"{ALG}.lam"), keys.get(f"{ALG}.num_step_returns")
        if lam is not None:
            keys.converted(
                f"{ALG}.lam",
                f"{ARGS}.returns gae, {ARGS}.gae_lambda {show(lam)}",
                {f"{ARGS}.returns": "gae", f"{ARGS}.gae_lambda": lam},
            )
            if keys.has(f"{ALG}.num_step_returns"):
                keys.converted(f"{ALG}.num_step_returns", "(unused: lam selects GAE, as upstream)")
        elif nstep is not None:
            keys.converted(
                f"{ALG}.num_step_returns",
                f"{ARGS}.returns nstep, {ARGS}.n_steps {nstep}",
                {f"{ARGS}.returns": "nstep", f"{ARGS}.n_steps": nstep},
            )
            if keys.has(f"{ALG}.lam"):
                keys.converted(f"{ALG}.lam", "(unused: num_step_returns selects n-step returns)")
    if t.cls == "Reinforce":
        simple(
            keys,
            {f"{ALG}.center_return": "center_returns", f"{ALG}.training_epoch": "training_epochs"},
        )
    if keys.has(f"{ALG}.val_loss_coef"):
        coef = keys.get(f"{ALG}.val_loss_coef")
        if t.cls == "Reinforce":
            keys.converted(f"{ALG}.val_loss_coef", "(unused: REINFORCE has no critic)")
        else:
            keys.converted(
                f"{ALG}.val_loss_coef",
                f"{ARGS}.value_coef {show(2 * coef)} (x2: SLM Lab's MSELoss against our half-MSE value loss)",
                {f"{ARGS}.value_coef": 2 * coef},
            )
    if keys.has(f"{ALG}.clip_vloss"):
        if keys.get(f"{ALG}.clip_vloss") and t.cls == "PPO":
            eps = keys.get(f"{ALG}.clip_eps_spec.start_val", 0.2)
            keys.converted(
                f"{ALG}.clip_vloss",
                f"{ARGS}.clip_value {show(eps)} (the clip range's start)",
                {f"{ARGS}.clip_value": eps},
            )
        elif not keys.get(f"{ALG}.clip_vloss"):
            keys.converted(f"{ALG}.clip_vloss", "(off here too)")
        else:
            keys.unsupported(f"{ALG}.clip_vloss", f"{t.cls} here has no value clipping")
    if keys.has(f"{ALG}.normalize_advantages") and t.cls in ("PPO", "A2C"):
        how = keys.get(f"{ALG}.normalize_advantages")
        if how in ("standardize", True, False, None):
            keys.converted(
                f"{ALG}.normalize_advantages",
                f"{ARGS}.normalize_advantages {show(how == 'standardize' or how is True)}",
                {f"{ARGS}.normalize_advantages": how == "standardize" or how is True},
            )
    _horizon(keys, t)
    memory = keys.get(f"{MEM}.name")
    if keys.has(f"{MEM}.name"):
        if memory in ("OnPolicyReplay", "OnPolicyBatchReplay"):
            keys.converted(f"{MEM}.name", "(implicit: the on-policy memory)")
        else:
            keys.unsupported(
                f"{MEM}.name", f"{memory}: policy gradients here use the on-policy memory"
            )
    if keys.has(f"{NET}.shared") and t.cls in ("PPO", "A2C"):
        keys.exact(f"{NET}.shared", f"{ARGS}.shared")
    # A shared MLP is the actor's body with a value head; a shared conv trunk feeds an actor
    # and a critic body (empty ones when fc_hid_layers has a single layer), as our ppo_pong.
    shared_mlp = bool(keys.get(f"{NET}.shared")) and keys.get(f"{NET}.type", "MLPNet") == "MLPNet"
    targets = ["actor"] if t.cls == "Reinforce" or shared_mlp else ["actor", "critic"]
    nets.bodies(keys, NET, targets)
    nets.mse_loss_spec(keys, NET, "value")
    _lr_and_optimizer(keys, t, TORCH_EPS)
    nets.common_net(keys, NET, clip_grad=True)


def _horizon(keys: SpecKeys, t: Target) -> None:
    """``time_horizon``, ``training_frequency`` and ``minibatch_size`` of on-policy training."""
    horizon = keys.get(f"{ALG}.time_horizon")
    freq = keys.get(f"{ALG}.training_frequency")
    episodic = keys.get(f"{MEM}.name") == "OnPolicyReplay"
    if horizon is not None:
        keys.exact(f"{ALG}.time_horizon", f"{ARGS}.time_horizon")
    if keys.has(f"{ALG}.training_frequency"):
        if horizon is not None or t.cls == "PPO":
            keys.converted(
                f"{ALG}.training_frequency",
                "(unused: a rollout is time_horizon steps, as upstream)",
            )
        elif episodic and freq is not None:
            steps = freq * (t.max_episode_steps or 1000)
            keys.converted(
                f"{ALG}.training_frequency",
                f"{ARGS}.time_horizon {steps} ({freq} episode(s) of up to {t.max_episode_steps} steps)",
                {f"{ARGS}.time_horizon": steps},
            )
            keys.note(
                f"{ALG}.training_frequency: SLM Lab trained on {freq} whole episode(s); here a rollout is time_horizon steps per env"
            )
            horizon = steps
        elif freq is not None:
            keys.converted(
                f"{ALG}.training_frequency",
                f"{ARGS}.time_horizon {freq}",
                {f"{ARGS}.time_horizon": freq},
            )
            horizon = freq
    if keys.has(f"{ALG}.minibatch_size"):
        size = keys.get(f"{ALG}.minibatch_size")
        if t.cls in ("PPO", "Reinforce") and horizon:
            count = max(1, horizon * t.num_envs // size)
            keys.converted(
                f"{ALG}.minibatch_size",
                f"{ARGS}.num_minibatches {count} (time_horizon x num_envs / minibatch_size)",
                {f"{ARGS}.num_minibatches": count},
            )
        else:
            keys.unsupported(f"{ALG}.minibatch_size", f"{t.cls} here trains on the whole rollout")


def q_learning(keys: SpecKeys, t: Target) -> None:
    """DQN (plain, double, dueling, PER) and SARSA."""
    nets.pdtype_and_policy(keys, exploration=True)
    simple(keys, {f"{ALG}.gamma": "gamma"})
    path = f"{ALG}.explore_var_spec"
    if keys.has(path):
        target = "temperature" if keys.get(f"{ALG}.action_policy") == "boltzmann" else "epsilon"
        nets.schedule(keys, path, f"{ARGS}.{target}")
    net_targets = ["net"]
    nets.bodies(keys, NET, net_targets)
    if keys.has(f"{NET}.loss_spec"):
        name = keys.get(f"{NET}.loss_spec.name")
        loss = {"MSELoss": "mse", "SmoothL1Loss": "huber", "HuberLoss": "huber"}.get(name)
        if loss is None:
            keys.unsupported(f"{NET}.loss_spec", f"{name}: losses here are mse and huber")
        else:
            keys.converted(f"{NET}.loss_spec", f"{ARGS}.loss {loss}", {f"{ARGS}.loss": loss})
    _lr_and_optimizer(keys, t, TORCH_EPS if t.family == "sarsa" else None)
    # Our mse is half the squared TD error, SLM Lab's nn.MSELoss the whole: our gradient is
    # half theirs, so clipping its norm at half their clip_grad_val clips the same updates
    # (and Adam's step is then the same, up to eps).
    mse = keys.config["model"]["init_args"].get("loss") == "mse"
    nets.common_net(keys, NET, clip_grad=True, grad_scale=0.5 if mse else 1.0)
    if t.family == "sarsa":
        _horizon(keys, t)
        if keys.has(f"{MEM}.name"):
            keys.converted(f"{MEM}.name", "(implicit: the on-policy memory)")
        return
    replay(keys, t, "dqn")
    updates = keys.config["model"]["init_args"].get("updates_per_step", 1)
    freq = keys.config["model"]["init_args"].get("training_frequency", 1)
    kind = keys.get(f"{NET}.update_type")
    every = keys.get(f"{NET}.update_frequency")
    if kind == "replace":
        keys.converted(
            f"{NET}.update_type", f"{ARGS}.tau null (hard copies)", {f"{ARGS}.tau": None}
        )
        if every is not None:
            keys.exact(f"{NET}.update_frequency", f"{ARGS}.target_update_frequency")
    elif kind == "polyak":
        coef = keys.get(f"{NET}.polyak_coef", 0.0)
        tau = nets.polyak_tau(coef, every or 1, updates / (freq * t.num_envs))
        if coef <= 0:
            keys.unsupported(
                f"{NET}.polyak_coef", "0 never updates the target net; tau here must be in (0, 1]"
            )
        else:
            keys.converted(
                f"{NET}.polyak_coef",
                f"{ARGS}.tau {show(tau)} (per update: {coef} every {every or 1} frames, {updates / (freq * t.num_envs):g} updates per frame)",
                {f"{ARGS}.tau": tau},
            )
        keys.converted(f"{NET}.update_type", f"{ARGS}.tau (Polyak)")
        if keys.has(f"{NET}.update_frequency"):
            keys.converted(
                f"{NET}.update_frequency", f"{ARGS}.tau (folded into the per-update rate)"
            )


def replay(keys: SpecKeys, t: Target, family: str) -> None:
    """The replay memory and the update cadence of DQN, SAC and CrossQ."""
    name = keys.get(f"{MEM}.name")
    if keys.has(f"{MEM}.name"):
        if name == "Replay":
            keys.converted(
                f"{MEM}.name",
                f"{ARGS}.prioritized false" if family == "dqn" else "(implicit: uniform replay)",
                {f"{ARGS}.prioritized": False} if family == "dqn" else None,
            )
        elif name == "PrioritizedReplay" and family == "dqn":
            keys.converted(f"{MEM}.name", f"{ARGS}.prioritized true", {f"{ARGS}.prioritized": True})
            keys.note(
                "PrioritizedReplay: SLM Lab applies no importance-sampling weights; per_beta keeps our default (0.4 -> 1)"
            )
        else:
            keys.unsupported(f"{MEM}.name", f"{name}: {t.cls} here uses uniform replay")
    simple(
        keys,
        {
            f"{MEM}.batch_size": "batch_size",
            f"{MEM}.max_size": "memory_size",
            f"{ALG}.training_start_step": "learning_starts",
        },
    )
    if family == "dqn":
        simple(
            keys,
            {
                f"{MEM}.alpha": "per_alpha",
                f"{MEM}.epsilon": "per_epsilon",
                f"{MEM}.use_cer": "combined_replay",
            },
        )
    elif keys.has(f"{MEM}.use_cer"):
        if keys.get(f"{MEM}.use_cer"):
            keys.unsupported(f"{MEM}.use_cer", f"{t.cls} here has no combined replay")
        else:
            keys.converted(f"{MEM}.use_cer", "(off here too)")
    if keys.has(f"{ALG}.training_frequency"):
        freq = keys.get(f"{ALG}.training_frequency")
        steps = nets.ceil_div(int(freq), t.num_envs)
        if t.num_envs == 1:
            keys.exact(f"{ALG}.training_frequency", f"{ARGS}.training_frequency")
        else:
            keys.converted(
                f"{ALG}.training_frequency",
                f"{ARGS}.training_frequency {steps} (vector steps: ceil({freq} / {t.num_envs} envs))",
                {f"{ARGS}.training_frequency": steps},
            )
    iters = [k for k in ("training_iter", "training_batch_iter") if keys.has(f"{ALG}.{k}")]
    if iters:
        total = 1
        for k in iters:
            total *= int(keys.get(f"{ALG}.{k}") or 1)
        for k in iters:
            keys.converted(
                f"{ALG}.{k}",
                f"{ARGS}.updates_per_step {total} ({' x '.join(iters)}; each update samples a fresh batch)",
                {f"{ARGS}.updates_per_step": total},
            )
