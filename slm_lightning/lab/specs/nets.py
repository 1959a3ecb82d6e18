"""``agent.net`` (and ``agent.critic_net``): bodies, optimizers, learning-rate schedules,
gradient clipping and target networks, onto our algorithms' arguments."""

import math
from typing import Any

from slm_lightning.lab.specs.report import SpecKeys, show
from slm_lightning.optim import OPTIMIZERS, OptimizerSpec

ARGS = "model.init_args"
# torch's eps for Adam-like optimizers, which SLM Lab used; ours is 1e-5 for these families.
TORCH_EPS = 1e-8
_OPTIMIZER_KWARGS = [f for f in OptimizerSpec.__dataclass_fields__ if f != "name"]
_IMPLICIT_PDTYPES = ("default", "Categorical", "Argmax", "Normal")


def optimizer(keys: SpecKeys, path: str, eps_default: float | None) -> float | None:
    """Map an ``optim_spec`` at ``path`` onto ``optimizer`` and return its lr.

    Args:
        keys: the spec's keys.
        path: e.g. ``agent.net.optim_spec``.
        eps_default: eps to write when the spec gives none (torch's, where our algorithm's
            default differs); None writes nothing.
    """
    spec = keys.get(path)
    name = spec.get("name", "Adam")
    if name not in OPTIMIZERS:
        keys.unsupported(f"{path}.name", f"{name}; optimizers here: {', '.join(OPTIMIZERS)}")
        name = "Adam"
    elif "name" in spec:
        keys.exact(f"{path}.name", f"{ARGS}.optimizer.name")
    keys.config.setdefault("model", {}).setdefault("init_args", {})
    opt = keys.config["model"]["init_args"].setdefault("optimizer", {"name": name})
    opt["name"] = name
    accepted = OptimizerSpec(name=name).accepted()
    for key in spec:
        if key in ("name", "lr"):
            continue
        if key in _OPTIMIZER_KWARGS and key in accepted:
            keys.exact(f"{path}.{key}", f"{ARGS}.optimizer.{key}")
        else:
            keys.unsupported(f"{path}.{key}", f"{name} here takes {', '.join(accepted)}")
    if "eps" in accepted and "eps" not in spec and eps_default is not None:
        opt["eps"] = eps_default
    return spec.get("lr")


def lr_schedule(keys: SpecKeys, lr: float | None, target: str, max_frames: int) -> None:
    """Write ``target`` (``model.init_args.lr``) from ``lr`` and ``agent.net.lr_scheduler_spec``."""
    path = "agent.net.lr_scheduler_spec"
    spec = keys.get(path)
    if not keys.has(path) or spec is None:
        if keys.has(path):
            keys.converted(path, f"(none: {target} stays constant)")
        return
    name = spec.get("name")
    if name == "LinearToZero":
        frame = int(spec.get("frame", max_frames))
        value: dict[str, Any] = {"start": lr, "end": 0.0}
        if frame < max_frames:
            value["end_frame"] = frame
        keys.converted(path, f"{target} {show(value)} (linear to 0)", {target: value})
    elif name == "StepLR" and lr:
        step, gamma = spec.get("step_size", 1), spec.get("gamma", 0.1)
        end = float(f"{lr * gamma ** (max_frames / step):.6g}")
        value = {"start": lr, "end": end, "kind": "exponential"}
        keys.converted(
            path,
            f"{target} {show(value)} (smooth, where StepLR multiplied by {gamma} every {step} frames)",
            {target: value},
        )
    else:
        keys.unsupported(path, f"{name}: lr schedules here are linear or exponential over frames")


def mlp(keys: SpecKeys, net: str) -> dict[str, Any] | None:
    """The MLPSpec of ``hid_layers`` / ``hid_layers_activation`` at ``net`` (claimed by the
    caller's report lines), or None when the spec gives no layers."""
    layers = keys.get(f"{net}.hid_layers")
    activation = keys.get(f"{net}.hid_layers_activation", "relu")
    if layers is None:
        return None
    return {"hidden_sizes": list(layers), "activation": activation}


def bodies(keys: SpecKeys, net: str, targets: list[str]) -> None:
    """Map the body of ``net`` (MLPNet, ConvNet) onto ``targets`` (``actor``, ``critic`` or
    ``net`` under model.init_args)."""
    kind = keys.get(f"{net}.type", "MLPNet")
    dueling = kind.startswith("Dueling")
    base = kind.removeprefix("Dueling")
    names = ", ".join(f"{ARGS}.{t}" for t in targets)
    if keys.has(f"{net}.type"):
        if dueling:
            keys.converted(f"{net}.type", f"{ARGS}.dueling true", {f"{ARGS}.dueling": True})
        elif base in ("MLPNet", "ConvNet"):
            keys.converted(
                f"{net}.type", f"{names} (MLP bodies{', conv trunk' if base == 'ConvNet' else ''})"
            )
        else:
            keys.unsupported(f"{net}.type", f"{kind}; nets here: MLPNet, ConvNet, Dueling*")
            return
    activation = keys.get(f"{net}.hid_layers_activation", "relu")
    if base == "ConvNet":
        layers = keys.get(f"{net}.conv_hid_layers") or []
        conv = {
            "channels": [layer[0] for layer in layers],
            "kernel_sizes": [layer[1] for layer in layers],
            "strides": [layer[2] for layer in layers],
        }
        odd = [layer for layer in layers if list(layer[3:]) not in ([], [0], [0, 1])]
        if odd:
            keys.unsupported(
                f"{net}.conv_hid_layers",
                f"padding/dilation {odd[0][3:]}: convs here have padding 0, dilation 1",
            )
        elif keys.has(f"{net}.conv_hid_layers"):
            keys.converted(
                f"{net}.conv_hid_layers", f"{ARGS}.conv {show(conv)}", {f"{ARGS}.conv": conv}
            )
        fc = list(keys.get(f"{net}.fc_hid_layers") or [])
        hidden = {"hidden_sizes": fc[1:], "activation": activation}
        writes = {f"{ARGS}.conv.hidden_size": fc[0] if fc else 0} | {
            f"{ARGS}.{t}": dict(hidden) for t in targets
        }
        sizes = ", ".join(f"{ARGS}.{t}.hidden_sizes" for t in targets)
        if keys.has(f"{net}.fc_hid_layers"):
            keys.converted(
                f"{net}.fc_hid_layers",
                f"{ARGS}.conv.hidden_size {fc[0] if fc else 0}, {sizes} {show(fc[1:])}",
                writes,
            )
        if keys.has(f"{net}.hid_layers_activation"):
            acts = ", ".join(f"{ARGS}.{t}.activation" for t in ["conv", *targets])
            keys.converted(
                f"{net}.hid_layers_activation", acts, {f"{ARGS}.conv.activation": activation}
            )
        return
    spec = mlp(keys, net)
    if spec is None:
        return
    for t in targets:
        keys.config.setdefault("model", {}).setdefault("init_args", {})[t] = {
            **spec,
            "hidden_sizes": list(spec["hidden_sizes"]),
        }
    keys.converted(f"{net}.hid_layers", f"{', '.join(f'{ARGS}.{t}.hidden_sizes' for t in targets)}")
    if keys.has(f"{net}.hid_layers_activation"):
        keys.converted(
            f"{net}.hid_layers_activation",
            f"{', '.join(f'{ARGS}.{t}.activation' for t in targets)}",
        )


def common_net(keys: SpecKeys, net: str, clip_grad: bool, grad_scale: float = 1.0) -> None:
    """Keys every net shares: gradient clipping, init, normalize, batch_norm, gpu.

    Args:
        keys: the spec's keys.
        net: e.g. ``agent.net``.
        clip_grad: whether the target algorithm has ``max_grad_norm``.
        grad_scale: our loss's gradient over SLM Lab's for the same batch; the clipping
            norm is scaled by it so that the same updates are clipped.
    """
    if keys.has(f"{net}.clip_grad_val"):
        value = keys.get(f"{net}.clip_grad_val")
        if clip_grad and value is not None and grad_scale != 1.0:
            keys.converted(
                f"{net}.clip_grad_val",
                f"{ARGS}.max_grad_norm {show(value * grad_scale)} (x{grad_scale:g}: our loss's "
                "gradient against SLM Lab's)",
                {f"{ARGS}.max_grad_norm": value * grad_scale},
            )
        elif clip_grad:
            keys.exact(f"{net}.clip_grad_val", f"{ARGS}.max_grad_norm")
        elif value is None:
            keys.converted(f"{net}.clip_grad_val", "(none: no gradient clipping here either)")
        else:
            keys.unsupported(f"{net}.clip_grad_val", "this algorithm has no gradient clipping here")
    if keys.has(f"{net}.init_fn"):
        init = keys.get(f"{net}.init_fn")
        if init in (None, "orthogonal_"):
            keys.converted(
                f"{net}.init_fn", "(implicit: layers here are always initialised orthogonally)"
            )
        else:
            keys.unsupported(
                f"{net}.init_fn", f"{init}: layers here are always initialised orthogonally"
            )
    if keys.has(f"{net}.normalize"):
        keys.converted(
            f"{net}.normalize",
            "(implicit: uint8 image observations are scaled by 1/255; MLPNet ignored it upstream)",
        )
    for flag in ("batch_norm", "layer_norm"):
        if keys.has(f"{net}.{flag}"):
            if keys.get(f"{net}.{flag}"):
                keys.unsupported(f"{net}.{flag}", "no normalisation layers in our MLP/conv bodies")
            else:
                keys.converted(f"{net}.{flag}", "(off here too)")
    if keys.has(f"{net}.gpu"):
        gpu = keys.get(f"{net}.gpu")
        accelerator = {True: "auto", False: "cpu"}.get(gpu, "auto")
        keys.converted(
            f"{net}.gpu", f"trainer.accelerator {accelerator}", {"trainer.accelerator": accelerator}
        )
        if gpu is True:
            keys.note(
                "gpu: true -> trainer.accelerator: auto (a machine without a GPU runs on CPU)"
            )


def mse_loss_spec(keys: SpecKeys, net: str, what: str) -> None:
    """A net's ``loss_spec``: MSELoss is what our value/critic loss is; any other is reported.

    Args:
        keys: the spec's keys.
        net: the net section's path.
        what: the loss it names (``value``, ``critic``).
    """
    if keys.has(f"{net}.loss_spec"):
        name = keys.get(f"{net}.loss_spec.name")
        if name == "MSELoss":
            keys.converted(f"{net}.loss_spec", f"(implicit: the {what} loss is MSE)")
        else:
            keys.unsupported(f"{net}.loss_spec", f"{name}: the {what} loss here is MSE")


def pdtype_and_policy(keys: SpecKeys, exploration: bool) -> None:
    """``action_pdtype`` and ``action_policy``: implicit here, or exploration for Q-learning."""
    path = "agent.algorithm.action_pdtype"
    if keys.has(path):
        kind = keys.get(path)
        if kind in _IMPLICIT_PDTYPES:
            keys.converted(path, "(implicit: Categorical for Discrete, Normal for Box actions)")
        else:
            keys.unsupported(path, f"{kind}: distributions here are Categorical and (tanh-)Normal")
    path = "agent.algorithm.action_policy"
    if keys.has(path):
        policy = keys.get(path)
        if exploration and policy in ("epsilon_greedy", "boltzmann"):
            keys.exact(path, f"{ARGS}.exploration")
        elif policy == "default" or (policy is None):
            keys.converted(path, "(implicit: sample the policy)")
        else:
            keys.unsupported(
                path, f"{policy}: use slm_lightning.algorithms.RandomAgent for random play"
            )


def schedule(keys: SpecKeys, path: str, target: str) -> None:
    """An SLM Lab schedule ``{name, start_val, end_val, start_step, end_step}`` at ``path`` as
    a number or our Schedule (both count environment frames) at ``target``."""
    spec = keys.get(path)
    if spec is None:
        keys.converted(path, f"(none: {target} keeps its default)")
        return
    name = spec.get("name", "linear_decay")
    start, end = spec.get("start_val"), spec.get("end_val", spec.get("start_val"))
    first, last = int(spec.get("start_step", 0)), int(spec.get("end_step", 0))
    if name == "no_decay" or start == end or last <= first:
        value: Any = start if name == "no_decay" or start == end else end
        keys.converted(path, f"{target} {show(value)} (constant)", {target: value})
        return
    if name not in ("linear_decay", "rate_decay"):
        keys.unsupported(path, f"{name}: schedules here are linear or exponential")
        return
    value = {"start": start, "end": end}
    if first:
        value["start_frame"] = first
    value["end_frame"] = last
    if name == "rate_decay":
        value["kind"] = "exponential"
    how = "exponential, where rate_decay decays per step" if name == "rate_decay" else "frames"
    keys.converted(path, f"{target} {show(value)} ({how})", {target: value})


def polyak_tau(tau: float, update_frequency: int, updates_per_frame: float) -> float:
    """Our per-update Polyak rate for SLM Lab's ``tau`` applied once every ``update_frequency``
    frames: ``1 - (1 - tau)^(1/U)`` with ``U`` the gradient updates in that many frames, so
    the target moves as far per frame as upstream's (rounded to 6 significant digits)."""
    updates = max(update_frequency * updates_per_frame, 1e-12)
    return float(f"{1.0 - (1.0 - tau) ** (1.0 / updates):.6g}")


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return max(1, math.ceil(a / b))
