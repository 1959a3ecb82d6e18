"""Cost of one Double-DQN gradient step in plain PyTorch, outside any trainer.

Usage:
    uv run python benchmarks/update_cost.py

Times the bare update of SLM Lab's CartPole DDQN+PER setting (4-256-128-2 ReLU MLP, batch
64, importance-weighted Huber loss, grad-norm clipping, fused Adam; one thread) and the
batch-256 64-64 update our ``ddqn_per_cartpole`` makes. At one update per frame the bare
update alone caps throughput at ``1000 / ms`` frames per second, whatever the trainer does
around it: it bounds any fps comparison made at equal updates-per-frame.
"""

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn


def update_ms(hidden: tuple[int, ...], batch: int, steps: int = 2000) -> float:
    layers: list[nn.Module] = []
    width = 4
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    net = nn.Sequential(*layers, nn.Linear(width, 2))
    target_net = copy.deepcopy(net).requires_grad_(False)
    params = list(net.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    obs, next_obs = torch.randn(batch, 4), torch.randn(batch, 4)
    actions = torch.randint(0, 2, (batch, 1))
    rewards, weights = torch.ones(batch), torch.rand(batch)
    discounts, terminated = torch.full((batch,), 0.99), torch.zeros(batch)

    def step() -> None:
        q_all = net(torch.cat([obs, next_obs]))
        q = q_all[:batch].gather(-1, actions).squeeze(-1)
        with torch.no_grad():
            best = q_all[batch:].argmax(-1, keepdim=True)
            next_q = target_net(next_obs).gather(-1, best).squeeze(-1)
            target = rewards + discounts * (1 - terminated) * next_q
        loss = (weights * F.smooth_l1_loss(q, target, reduction="none")).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 10.0, foreach=True)
        optimizer.step()

    for _ in range(200):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    torch.set_num_threads(1)
    for name, hidden, batch in (
        ("SLM Lab ddqn_per_cartpole net", (256, 128), 64),
        ("slm_lightning ddqn_per_cartpole net", (64, 64), 256),
    ):
        ms = update_ms(hidden, batch)
        print(f"{name}: {ms:.3f} ms per update -> at most {1000 / ms:,.0f} fps at 1 update/frame")


if __name__ == "__main__":
    main()
