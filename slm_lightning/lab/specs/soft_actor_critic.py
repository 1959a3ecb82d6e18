"""``agent`` of SAC and CrossQ specs onto our SAC / CrossQ arguments: replay, the actor and
critic nets (``net`` and ``critic_net``), their optimizers and the Polyak rate."""

from slm_lightning.lab.specs import nets
from slm_lightning.lab.specs.algorithms import ALG, NET, Target, replay, simple
from slm_lightning.lab.specs.nets import ARGS
from slm_lightning.lab.specs.report import SpecKeys, show


def soft_actor_critic(keys: SpecKeys, t: Target) -> None:
    """SAC and CrossQ."""
    nets.pdtype_and_policy(keys, exploration=False)
    if keys.has(f"{ALG}.explore_var_spec"):
        keys.converted(f"{ALG}.explore_var_spec", "(none: SAC explores by sampling)")
    simple(
        keys,
        {
            f"{ALG}.gamma": "gamma",
            f"{ALG}.policy_delay": "policy_delay",
            f"{ALG}.alpha_lr": "alpha_lr",
        },
    )
    for key in ("fixed_alpha", "alpha"):
        if keys.has(f"{ALG}.{key}"):
            keys.exact(f"{ALG}.{key}", f"{ARGS}.alpha")
    if keys.has(f"{ALG}.target_entropy"):
        value = keys.get(f"{ALG}.target_entropy")
        keys.converted(
            f"{ALG}.target_entropy",
            f"{ARGS}.target_entropy {show(None if value == 'auto' else value)}",
            {f"{ARGS}.target_entropy": None if value == "auto" else value},
        )
    replay(keys, t, "sac")
    critic = "agent.critic_net" if keys.has("agent.critic_net") else NET
    nets.bodies(keys, NET, ["actor"])
    if critic != NET:
        nets.bodies(keys, critic, ["critic"])
    elif (body := nets.mlp(keys, NET)) is not None:
        keys.config["model"]["init_args"]["critic"] = body
    if keys.has(f"{NET}.optim_spec"):
        lr = nets.optimizer(keys, f"{NET}.optim_spec", None)
        keys.converted(f"{NET}.optim_spec.lr", f"{ARGS}.actor_lr", {f"{ARGS}.actor_lr": lr})
        if not keys.has(f"{critic}.optim_spec.lr") or critic == NET:
            keys.config["model"]["init_args"]["critic_lr"] = lr
    if critic != NET and keys.has(f"{critic}.optim_spec"):
        for leaf in [k for k in keys.leaves if k.startswith(f"{critic}.optim_spec.")]:
            field = leaf.rsplit(".", 1)[1]
            if field == "lr":
                keys.exact(leaf, f"{ARGS}.critic_lr")
            elif keys.get(leaf) == keys.get(f"{NET}.optim_spec.{field}"):
                keys.converted(leaf, f"{ARGS}.optimizer.{field} (the same as the actor's)")
            else:
                keys.unsupported(leaf, "one optimizer class trains actor and critics here")
    for net in {NET, critic}:
        nets.common_net(keys, net, clip_grad=False)
        nets.mse_loss_spec(keys, net, "critic")
        if (
            t.cls == "SAC"
            and keys.get(f"{net}.update_type", "polyak") == "polyak"
            and keys.has(f"{net}.polyak_coef")
        ):
            keys.exact(f"{net}.polyak_coef", f"{ARGS}.tau")
            if keys.has(f"{net}.update_type"):
                keys.converted(f"{net}.update_type", f"{ARGS}.tau (Polyak every update)")
            if keys.has(f"{net}.update_frequency"):
                if keys.get(f"{net}.update_frequency") in (1, None):
                    keys.converted(f"{net}.update_frequency", "(every update, as here)")
                else:
                    keys.unsupported(
                        f"{net}.update_frequency", "SAC here moves its targets every update"
                    )
