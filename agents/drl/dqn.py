"""Double DQN from lookahead demonstrations (DQfD-style), in one file: config, network, buffer, training loop.

Why this algorithm: an env step is one fluence-map optimisation (0.1-1 s here), so a 30-minute budget buys a few
thousand steps and sample efficiency decides. Two things make every optimisation count:

1. Demonstrations from a one-step-lookahead expert. At each visited state the expert previews all ``2k`` actions
   (each one optimisation) and takes the one with the best reward (ties broken on the protocol margin). Every
   preview is a real transition ``(s, a, r, s')``, so a demonstration state fills the whole Q-row, not one entry;
   the chosen action also gets DQfD's large-margin loss ``max_a [Q(s,a) + m·1(a ≠ a_E)] − Q(s, a_E)``.
2. Many gradient updates per env step on a small MLP (cheap next to an optimisation), with double-DQN targets
   ``r + γ·Q_target(s', argmax_a Q(s', a))`` (bootstrapping through truncation, not termination) and a Huber loss.

After demonstrations and a supervised pre-training pass, the agent explores ε-greedily; demonstration transitions
stay in the buffer. The greedy policy is validated on validation-cohort cases at intervals and the best network
(most cases at the maximum score, then mean final score, then fewer steps) is the one saved.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from m2m.agents.drl.env import SCORE_TOLERANCE, PlanningEnv
from m2m.agents.drl.evaluate import EpisodeRecord, run_cohort, summarise

log = structlog.get_logger()

CHECKPOINT_FORMAT = "m2m.drl.dqn-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class DqnConfig:
    """Every hyperparameter of a training run. Budgets count optimisations (env steps, previews included)."""

    seed: int = 0
    scenario: str = "prostate-basic"
    train_cases: int = 30  # first seeds of the training cohort used
    validation_cases: int = 6  # first seeds of the validation cohort used
    wall_minutes: float = 35.0  # the whole run stops when this is spent (a validation may finish after it)
    demo_fraction: float = 0.45  # share of the wall budget for demonstrations
    demo_max_steps: int = 8  # expert steps per demonstration episode
    demo_max_episodes: int = 10_000  # at least one demonstration episode always runs
    agent_env_steps: int = 4000  # ε-greedy env steps after demonstrations (if time allows)
    gamma: float = 0.9
    learning_rate: float = 5e-4
    weight_decay: float = 1e-5
    batch_size: int = 64
    buffer_size: int = 50_000
    hidden: int = 256
    pretrain_updates: int = 2000
    updates_per_step: int = 4
    target_update_interval: int = 200  # gradient updates between target-network syncs
    margin: float = 0.2  # DQfD large margin, in reward units (smoothed-score points)
    margin_weight: float = 1.0
    eps_start: float = 0.25
    eps_end: float = 0.02
    eps_decay_steps: int = 1500
    validate_every: int = 400  # agent env steps between validations
    fmo_max_iterations: int = 100  # per re-optimisation; warm starts carry on where a capped solve stopped
    torch_threads: int = 1


class QNetwork(nn.Module):
    """MLP from observation to one Q-value per action (reward units)."""

    def __init__(self, n_obs: int, n_actions: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(n_obs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_actions)
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(obs)
        return out


class ReplayBuffer:
    """Fixed-size ring buffer of transitions; ``expert`` marks the demonstrated action of a state."""

    def __init__(self, capacity: int, n_obs: int) -> None:
        self.obs = np.zeros((capacity, n_obs), dtype=np.float32)
        self.next_obs = np.zeros((capacity, n_obs), dtype=np.float32)
        self.action = np.zeros(capacity, dtype=np.int64)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.terminal = np.zeros(capacity, dtype=np.float32)
        self.expert = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.size, self._next = capacity, 0, 0

    def add(self, obs: np.ndarray, action: int, reward: float, next_obs: np.ndarray, terminal: bool,
            expert: bool = False) -> None:
        i = self._next
        self.obs[i], self.action[i], self.reward[i] = obs, action, reward
        self.next_obs[i], self.terminal[i], self.expert[i] = next_obs, float(terminal), float(expert)
        self._next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch_size: int) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, size=batch_size)
        return {
            "obs": torch.from_numpy(self.obs[idx]),
            "action": torch.from_numpy(self.action[idx]),
            "reward": torch.from_numpy(self.reward[idx]),
            "next_obs": torch.from_numpy(self.next_obs[idx]),
            "terminal": torch.from_numpy(self.terminal[idx]),
            "expert": torch.from_numpy(self.expert[idx]),
        }


def dqn_loss(q_net: QNetwork, target_net: QNetwork, batch: dict[str, torch.Tensor], cfg: DqnConfig) -> torch.Tensor:
    """Double-DQN Huber TD loss plus the large-margin loss on demonstrated actions."""
    q_all = q_net(batch["obs"])
    q = q_all.gather(1, batch["action"][:, None]).squeeze(1)
    with torch.no_grad():
        best_next = q_net(batch["next_obs"]).argmax(dim=1, keepdim=True)
        next_q = target_net(batch["next_obs"]).gather(1, best_next).squeeze(1)
        target = batch["reward"] + cfg.gamma * (1.0 - batch["terminal"]) * next_q
    loss = nn.functional.smooth_l1_loss(q, target)
    expert = batch["expert"]
    if float(expert.sum()) > 0:
        margins = torch.full_like(q_all, cfg.margin)
        margins.scatter_(1, batch["action"][:, None], 0.0)
        violation = (q_all + margins).max(dim=1).values - q
        loss = loss + cfg.margin_weight * (violation * expert).sum() / expert.sum()
    return loss


def expert_sweep(env: PlanningEnv) -> tuple[int, list[tuple[int, float, np.ndarray, bool]]]:
    """Preview every action from the env's current state; return the lookahead expert's choice and all
    ``(action, reward, next_obs, terminated)`` outcomes."""
    outcomes = []
    for a in range(int(env.action_space.n)):
        t = env.preview(a)
        outcomes.append((a, t.reward, t.observation, t.terminated, t.report.margin()))
    best = max(outcomes, key=lambda o: (o[1], o[4]))[0]
    return best, [(a, r, obs, term) for a, r, obs, term, _ in outcomes]


def greedy_policy(q_net: QNetwork) -> Callable[[np.ndarray], int]:
    """The policy ``argmax_a Q(obs, a)``."""

    def act(obs: np.ndarray) -> int:
        with torch.no_grad():
            return int(q_net(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax(dim=1).item())

    return act


@dataclass
class TrainingLog:
    """What a run did: per-episode results (env-step count at the end of each), validations and timings."""

    episodes: list[dict[str, Any]] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    env_steps: int = 0
    env_seconds: float = 0.0
    demo_episodes: int = 0
    agent_episodes: int = 0
    gradient_updates: int = 0
    wall_seconds: float = 0.0


def save_checkpoint(path: Path, q_net: QNetwork, meta: dict[str, Any]) -> str:
    """Write network weights and ``meta`` (plain JSON-able values) with :func:`torch.save`; return its sha256."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": {k: v.detach().clone() for k, v in q_net.state_dict().items()},
        "meta_json": json.dumps(meta, sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: Path) -> tuple[QNetwork, dict[str, Any]]:
    """The network (eval mode) and metadata of a checkpoint written by :func:`save_checkpoint`."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT or payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint")
    meta = json.loads(payload["meta_json"])
    q_net = QNetwork(meta["n_obs"], meta["n_actions"], meta["hidden"])
    q_net.load_state_dict(payload["state_dict"])
    q_net.eval()
    return q_net, meta


def train(
    cfg: DqnConfig,
    env: PlanningEnv,
    validation_env: PlanningEnv,
    validation_seeds: list[int],
    on_progress: Callable[[TrainingLog, str], None] | None = None,
) -> tuple[QNetwork, TrainingLog]:
    """Train on ``env`` within ``cfg.wall_minutes``; return the best validated network and the run's log."""
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    deadline = started + 60.0 * cfg.wall_minutes
    n_obs, n_actions = int(env.observation_space.shape[0]), int(env.action_space.n)
    q_net = QNetwork(n_obs, n_actions, cfg.hidden)
    target_net = QNetwork(n_obs, n_actions, cfg.hidden)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.AdamW(q_net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    buffer = ReplayBuffer(cfg.buffer_size, n_obs)
    tlog = TrainingLog()
    best: tuple[tuple[float, float, float], dict[str, torch.Tensor]] | None = None
    episode_seed = iter(range(cfg.seed * 1_000_003, cfg.seed * 1_000_003 + 10**6))

    def note(message: str) -> None:
        tlog.wall_seconds = time.perf_counter() - started
        if on_progress is not None:
            on_progress(tlog, message)

    def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        tlog.env_seconds += time.perf_counter() - t0
        tlog.env_steps += 1
        return out

    def fresh_episode() -> tuple[np.ndarray, dict[str, Any]]:
        # A start that already scores the maximum asks nothing of the policy: draw another.
        while True:
            obs, info = timed(env.reset, seed=next(episode_seed))
            if info["score"] < info["max_score"] - SCORE_TOLERANCE:
                return obs, info

    def update(n: int) -> None:
        for _ in range(n):
            loss = dqn_loss(q_net, target_net, buffer.sample(rng, cfg.batch_size), cfg)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(q_net.parameters(), 10.0)
            optimizer.step()
            tlog.gradient_updates += 1
            if tlog.gradient_updates % cfg.target_update_interval == 0:
                target_net.load_state_dict(q_net.state_dict())

    def validate() -> None:
        nonlocal best
        q_net.eval()
        t0 = time.perf_counter()
        records = run_cohort(validation_env, greedy_policy(q_net), validation_seeds)
        q_net.train()
        s = summarise(records)
        entry = {"env_steps": tlog.env_steps, "wall_s": time.perf_counter() - started, **s.as_dict(),
                 "seconds": time.perf_counter() - t0}
        tlog.validations.append(entry)
        key = (s.pct_at_max, s.final_mean, -s.steps_mean)
        if best is None or key > best[0]:
            best = (key, {k: v.detach().clone() for k, v in q_net.state_dict().items()})
        log.info("drl_validation", **{k: round(v, 3) for k, v in entry.items()})
        note(f"validation: {s.final_mean:.2f}/{s.max_score:g}, {s.pct_at_max:.0f}% at max")

    def record_episode(kind: str, info: dict[str, Any], initial: float, steps: int) -> None:
        entry = {"kind": kind, "env_steps": tlog.env_steps, "case_id": info["case_id"], "initial_score": initial,
                 "final_score": float(info["score"]), "steps": steps}
        tlog.episodes.append(entry)
        log.info("drl_episode", **entry)
        note(f"{kind} episode {len(tlog.episodes)}: {initial:.2f} → {info['score']:.2f} in {steps} steps")

    # Phase 1: lookahead demonstrations.
    demo_deadline = started + cfg.demo_fraction * (deadline - started)
    while tlog.demo_episodes == 0 or (
        time.perf_counter() < demo_deadline and tlog.demo_episodes < cfg.demo_max_episodes
    ):
        obs, info = fresh_episode()
        initial, steps = float(info["score"]), 0
        while steps < cfg.demo_max_steps:
            t0 = time.perf_counter()
            best_action, outcomes = expert_sweep(env)
            tlog.env_seconds += time.perf_counter() - t0
            tlog.env_steps += len(outcomes)
            for a, r, next_obs, term in outcomes:
                buffer.add(obs, a, r, next_obs, term, expert=a == best_action)
            obs, _r, terminated, _trunc, info = env.step(best_action)  # reuses the preview: no optimisation
            steps += 1
            if terminated or time.perf_counter() > demo_deadline:
                break
        tlog.demo_episodes += 1
        record_episode("demo", info, initial, steps)

    # Phase 2: supervised pre-training on the demonstrations, then ε-greedy interaction.
    update(cfg.pretrain_updates)
    validate()
    obs, info = fresh_episode()
    initial, ep_steps, agent_steps = float(info["score"]), 0, 0
    while agent_steps < cfg.agent_env_steps and time.perf_counter() < deadline:
        eps = cfg.eps_end + (cfg.eps_start - cfg.eps_end) * max(0.0, 1.0 - agent_steps / cfg.eps_decay_steps)
        action = int(rng.integers(n_actions)) if rng.random() < eps else greedy_policy(q_net)(obs)
        next_obs, reward, terminated, truncated, info = timed(env.step, action)
        buffer.add(obs, action, reward, next_obs, terminated)
        obs, ep_steps, agent_steps = next_obs, ep_steps + 1, agent_steps + 1
        update(cfg.updates_per_step)
        if terminated or truncated:
            tlog.agent_episodes += 1
            record_episode("agent", info, initial, ep_steps)
            obs, info = fresh_episode()
            initial, ep_steps = float(info["score"]), 0
        if agent_steps % cfg.validate_every == 0:
            validate()
    validate()
    assert best is not None
    q_net.load_state_dict(best[1])
    q_net.eval()
    tlog.wall_seconds = time.perf_counter() - started
    return q_net, tlog


def checkpoint_meta(cfg: DqnConfig, env: PlanningEnv, roles: dict[str, str], tlog: TrainingLog) -> dict[str, Any]:
    """What a checkpoint must carry to be used without the training code's context."""
    by_structure = {s: r for r, s in roles.items()}
    role_tpps = [f"{n.partition('_')[0]}_{by_structure[n.partition('_')[2]]}" for n in env.tpp_names]
    return {
        "config": asdict(cfg),
        "n_obs": int(env.observation_space.shape[0]),
        "n_actions": int(env.action_space.n),
        "hidden": cfg.hidden,
        "controlled_roles": [by_structure[s] for s in env.controlled],
        "role_labels": {r: s for r, s in roles.items() if s in env.controlled},
        "tpp_roles": role_tpps,
        "best_validation": max(tlog.validations, key=lambda v: (v["pct_at_max"], v["final_mean"], -v["steps_mean"])),
    }


def episode_to_dict(record: EpisodeRecord) -> dict[str, Any]:
    """A JSON-able view of an episode (used in summaries)."""
    return {**asdict(record), "steps": record.steps, "reached_max": record.reached_max}
