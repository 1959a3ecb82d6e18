"""Cost of one off-policy update in plain PyTorch, outside any trainer, and the share of it
that is matrix products: the fastest any eager trainer, and any float32 implementation, can
run a setting on this machine.

Usage:
    uv run python benchmarks/update_cost.py              # every case
    uv run python benchmarks/update_cost.py --case sac_pendulum_64 dqn_cartpole_zoo --compile

Each case is the bare update of a setting the benchmarks compare (forward passes, losses,
backward, gradient clipping where the algorithm clips, fused Adam, target update; torch on
one thread; no trainer, env, replay or logging), run as PyTorch eager runs it, op by op,
as our algorithms and Stable-Baselines3 both do. Two figures are measured:

- ``update ms``: wall time of one update (the fastest of several repeats);
- ``matmul ms``: the time of its matrix products (``mm``, ``addmm``, ``bmm``, ``baddbmm``),
  summed from torch's profiler over many updates (each op's own time, with the profiler's
  µs of bookkeeping).

At the case's updates per frame they cap the frames per second:

- ``eager ceiling`` = 1000 / (update ms x updates per frame): no trainer that runs this update
  in eager PyTorch goes faster, whatever it does around the update (and the env steps and
  action choices still come on top);
- ``arithmetic ceiling`` = 1000 / (matmul ms x updates per frame): no float32 implementation
  on one thread goes faster, however few its other ops (compiled, fused, hand-written).

An fps target above the eager ceiling needs fewer ops than eager PyTorch runs; one above
the arithmetic ceiling needs less arithmetic or a lower precision. ``--compile`` also times
the whole update under ``torch.compile`` (inductor; the backward and the optimizer step
included, as LeanRL compiles its updates), and the seconds its first calls take.
"""

import argparse
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MATMULS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def mlp(sizes: list[int]) -> nn.Sequential:
    """ReLU MLP through ``sizes`` (input, hidden..., output), linear output."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def dqn_update(
    hidden: tuple[int, ...], batch: int, double: bool, weighted: bool
) -> Callable[[], None]:
    """One (Double) DQN step on CartPole-sized data: Huber loss (weighted as prioritized
    replay weights it), gradient norm clipped to 10 (SB3's and SLM Lab's), fused Adam.
    Double DQN runs the online net over ``s`` and ``s'`` in one pass, as
    ``DQN.loss_terms`` does."""
    net = mlp([4, *hidden, 2])
    target_net = copy.deepcopy(net).requires_grad_(False)
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    obs, next_obs = torch.randn(batch, 4), torch.randn(batch, 4)
    actions = torch.randint(0, 2, (batch, 1))
    rewards, weights = torch.ones(batch), torch.rand(batch)
    discounts, terminated = torch.full((batch,), 0.99), torch.zeros(batch)

    def step() -> None:
        if double:
            q_all = net(torch.cat([obs, next_obs]))
            q_values, next_online = q_all[:batch], q_all[batch:].detach()
        else:
            q_values = net(obs)
        q = q_values.gather(-1, actions).squeeze(-1)
        with torch.no_grad():
            next_q = target_net(next_obs)
            if double:
                next_value = next_q.gather(-1, next_online.argmax(-1, keepdim=True)).squeeze(-1)
            else:
                next_value = next_q.max(-1).values
            target = rewards + discounts * (1 - terminated) * next_value
        elementwise = F.smooth_l1_loss(q, target, reduction="none")
        loss = (weights * elementwise).mean() if weighted else elementwise.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0, foreach=True)
        optimizer.step()

    return step


def sac_update(
    obs_dim: int, act_dim: int, hidden: tuple[int, ...], batch: int
) -> Callable[[], None]:
    """One SAC step (Haarnoja et al. 2018b): twin critics against Polyak-averaged targets and
    the tanh-Gaussian policy's soft value, then one actor and temperature step; the critics
    carry no weight gradients in the actor's backward (as in ``update_actor_and_alpha``)."""
    body = mlp([obs_dim, *hidden])
    body.append(nn.ReLU())
    heads = nn.Linear(hidden[-1], 2 * act_dim)  # mean and log std
    actor = nn.ModuleList([body, heads])
    critics = nn.ModuleList([mlp([obs_dim + act_dim, *hidden, 1]) for _ in range(2)])
    targets = copy.deepcopy(critics).requires_grad_(False)
    log_alpha = torch.zeros((), requires_grad=True)
    critic_params, target_params = list(critics.parameters()), list(targets.parameters())
    critic_opt = torch.optim.Adam(critic_params, lr=3e-4, fused=True)
    actor_opt = torch.optim.Adam(list(actor.parameters()) + [log_alpha], lr=3e-4, fused=True)
    obs, next_obs = torch.randn(batch, obs_dim), torch.randn(batch, obs_dim)
    actions = torch.rand(batch, act_dim) * 2 - 1
    rewards, discounts, terminated = (
        torch.randn(batch),
        torch.full((batch,), 0.99),
        torch.zeros(batch),
    )

    def policy(states: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = heads(body(states)).chunk(2, -1)
        log_std = log_std.clamp(-5.0, 2.0)
        noise = torch.randn_like(mean)
        u = mean + log_std.exp() * noise
        log_det = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        log_prob = (-0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi) - log_det).sum(-1)
        return torch.tanh(u), log_prob

    def q_min(nets: nn.ModuleList, states: Tensor, acts: Tensor) -> Tensor:
        x = torch.cat([states, acts], -1)
        return torch.minimum(nets[0](x), nets[1](x)).squeeze(-1)

    def step() -> None:
        alpha = log_alpha.detach().exp()
        with torch.no_grad():
            next_actions, next_log_prob = policy(next_obs)
            next_value = q_min(targets, next_obs, next_actions) - alpha * next_log_prob
            target = rewards + discounts * (1 - terminated) * next_value
        x = torch.cat([obs, actions], -1)
        critic_loss = sum(0.5 * (net(x).squeeze(-1) - target).pow(2).mean() for net in critics)
        critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(target_params, critic_params, 0.005)
        critics.requires_grad_(False)
        new_actions, log_prob = policy(obs)
        actor_loss = (alpha * log_prob - q_min(critics, obs, new_actions)).mean()
        alpha_loss = (log_alpha * (-log_prob.detach() + act_dim)).mean()
        actor_opt.zero_grad(set_to_none=True)
        (actor_loss + alpha_loss).backward()
        actor_opt.step()
        critics.requires_grad_(True)

    return step


@dataclass(frozen=True)
class Case:
    """A setting: its update, and how many updates a frame carries."""

    label: str
    build: Callable[[], Callable[[], None]]
    updates_per_frame: float


CASES = {
    "slm_lab_ddqn_per": Case(
        "SLM Lab's ddqn_per_cartpole ([256, 128], batch 64)",
        lambda: dqn_update((256, 128), 64, double=True, weighted=True),
        1.0,
    ),
    "ddqn_per_cartpole": Case(
        "ddqn_per_cartpole ([64, 64], batch 256, 12 envs)",
        lambda: dqn_update((64, 64), 256, double=True, weighted=True),
        1 / 12,
    ),
    "dqn_cartpole_zoo": Case(
        "RL Zoo's DQN CartPole ([256, 256], batch 64)",
        lambda: dqn_update((256, 256), 64, double=False, weighted=False),
        0.5,
    ),
    "sac_pendulum_64": Case(
        "SAC Pendulum ([64, 64], batch 256)", lambda: sac_update(3, 1, (64, 64), 256), 1.0
    ),
    "sac_pendulum_256": Case(
        "SAC Pendulum ([256, 256], batch 256)", lambda: sac_update(3, 1, (256, 256), 256), 1.0
    ),
    "sac_hopper": Case(
        "SAC Hopper ([256, 256], batch 256)", lambda: sac_update(11, 3, (256, 256), 256), 1.0
    ),
}


def update_ms(step: Callable[[], None], seconds: float = 2.0) -> float:
    """Milliseconds per call of ``step``: the fastest of five timed repeats of about
    ``seconds / 5`` each, after a warm-up."""
    start = time.perf_counter()
    warm = 0
    while time.perf_counter() - start < 0.3 or warm < 20:
        step()
        warm += 1
    calls = max(10, int(warm / (time.perf_counter() - start) * seconds / 5))
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def matmul_ms(step: Callable[[], None], calls: int = 100) -> float:
    """Milliseconds of matrix products per call of ``step`` (their own time in torch's
    profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    micros = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in MATMULS)
    return micros / calls / 1e3


def measure(case: Case) -> dict[str, float]:
    """The case's update ms, matmul ms and the two fps ceilings."""
    torch.manual_seed(0)
    step = case.build()
    ms = update_ms(step)
    matmul = matmul_ms(step)
    return {
        "update_ms": ms,
        "matmul_ms": matmul,
        "eager_fps": 1000 / (ms * case.updates_per_frame),
        "arithmetic_fps": 1000 / (matmul * case.updates_per_frame),
    }


def measure_compiled(case: Case) -> dict[str, float]:
    """The case's update under ``torch.compile``: seconds of its first three calls (the
    compilation), then ms per update."""
    torch.manual_seed(0)
    step = torch.compile(case.build())
    start = time.perf_counter()
    for _ in range(3):
        step()
    return {"compile_s": time.perf_counter() - start, "compiled_ms": update_ms(step)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument(
        "--compile", action="store_true", help="also time the update under torch.compile"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    header = "| case | updates per frame | update ms | matmul ms | eager ceiling fps | "
    header += "arithmetic ceiling fps |"
    if args.compile:
        header += " compiled ms | compile s |"
    print(header)
    print("|---|" + "---:|" * (header.count("|") - 2))
    for name in args.case:
        case = CASES[name]
        row = measure(case)
        line = (
            f"| {case.label} | {case.updates_per_frame:.3g} | {row['update_ms']:.2f} | "
            f"{row['matmul_ms']:.2f} | {row['eager_fps']:,.0f} | {row['arithmetic_fps']:,.0f} |"
        )
        if args.compile:
            compiled = measure_compiled(case)
            line += f" {compiled['compiled_ms']:.2f} | {compiled['compile_s']:.0f} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
