"""Double DQN from an expert that labels every state it is shown (DQfD demonstrations + DAgger), in one file:
config, network, buffer, actors, training loop.

Why this algorithm: an env step is one fluence-map optimisation (0.1-1 s here), so a 45-minute budget buys some
ten thousand steps and sample efficiency decides. The expert is a one-step lookahead: at a state it previews every
admissible action (each one optimisation) and picks the best reward (ties broken on the protocol margin). Every
preview is a real transition ``(s, a, r, s')``, so a labelled state fills its whole Q-row, not one entry, and the
expert's choice also gets DQfD's large-margin loss ``max_a [Q(s,a) + m·1(a ≠ a_E)] − Q(s, a_E)``. Targets are
double-DQN, ``r + γ·Q_target(s', argmax_a Q(s', a))`` (bootstrapping through truncation, not termination), with a
Huber loss and many gradient updates per labelled state (a small MLP is cheap next to an optimisation).

1. Demonstrations: the expert plans episodes itself (``demo_fraction`` of the budget), then a supervised
   pre-training pass.
2. Expert-labelled rollouts (DAgger): the masked greedy policy (ε-random among admissible actions) plans, and the
   expert labels every state the *policy* visits. A policy trained on the expert's states alone drifts into states
   the expert never showed it — the first shipped policy lowered ``lambda_rectum`` 16 times in a row to 1e-4 — and
   these rollouts put exactly those states, with the right label, in the buffer.

Episodes run in ``workers`` actor processes (each holds its own environment; an episode gets the current network
weights when it starts), so both cores optimise plans while the learner updates. The masked greedy policy is
validated on the validation cohort every few episodes; the best network (most cases at the maximum score, then
mean final score, then fewer steps) is the one returned. With several workers, which episode finishes first
depends on timing, so a run is reproducible in its configuration, not bit for bit.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch import nn

from m2m.agents.drl.env import SCORE_TOLERANCE, PlanningEnv
from m2m.agents.drl.evaluate import EpisodeRecord, run_cohort, summarise
from m2m.physics.sparse import set_product_threads
from m2m.scenarios.cases import file_sha256

log = structlog.get_logger()

CHECKPOINT_FORMAT = "m2m.drl.dqn-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class DqnConfig:
    """Every hyperparameter of a training run. Budgets count optimisations (env steps, previews included)."""

    seed: int = 0
    scenario: str = "prostate-basic"
    train_cases: int = 30  # first seeds of the training cohort used
    validation_cases: int = 16  # first seeds of the validation cohort used
    wall_minutes: float = 45.0  # no episode starts after this (but one demonstration and one rollout always run)
    workers: int = 2  # actor processes; 0 runs every episode in the learner's process
    demo_fraction: float = 0.3  # share of the wall budget for expert demonstrations
    demo_max_steps: int = 8  # expert steps per demonstration episode
    rollout_max_steps: int = 12  # policy steps per expert-labelled rollout
    rollout_epsilon: float = 0.1  # share of random admissible actions in rollouts
    gamma: float = 0.9
    learning_rate: float = 5e-4
    weight_decay: float = 1e-5
    batch_size: int = 64
    buffer_size: int = 100_000
    hidden: int = 256
    pretrain_updates: int = 2000
    updates_per_state: int = 12  # gradient updates per expert-labelled rollout state
    target_update_interval: int = 200  # gradient updates between target-network syncs
    margin: float = 0.2  # DQfD large margin, in reward units (smoothed-score points)
    margin_weight: float = 1.0
    validate_every_episodes: int = 10  # rollout episodes between validations
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
    """Preview every admissible action (:meth:`PlanningEnv.action_masks`) from the env's current state; return the
    lookahead expert's choice and all ``(action, reward, next_obs, terminated)`` outcomes."""
    outcomes = []
    for a in np.flatnonzero(env.action_masks()):
        t = env.preview(int(a))
        outcomes.append((int(a), t.reward, t.observation, t.terminated, t.report.margin()))
    best = max(outcomes, key=lambda o: (o[1], o[4]))[0]
    return best, [(a, r, obs, term) for a, r, obs, term, _ in outcomes]


def greedy_policy(q_net: QNetwork, env: PlanningEnv | None = None) -> Callable[[np.ndarray], int]:
    """The policy ``argmax_a Q(obs, a)``; with ``env``, over the actions that change a TPP there (the rule that
    evaluation, knowledge and advice use)."""

    def act(obs: np.ndarray) -> int:
        with torch.no_grad():
            q = q_net(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy()
        if env is not None:
            q = np.where(env.action_masks(), q, -np.inf)
        return int(np.argmax(q))

    return act


@dataclass
class Rollout:
    """One actor episode: every labelled transition (rows of the arrays) and what the episode did. ``kind`` is
    ``demo`` (the expert acted) or ``rollout`` (the policy acted, the expert labelled)."""

    kind: str
    case_id: str
    initial_score: float
    final_score: float
    steps: int
    optimisations: int
    env_seconds: float
    obs: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    terminal: np.ndarray
    expert: np.ndarray


def rollout(
    env: PlanningEnv, episode_seed: int, weights: dict[str, torch.Tensor] | None, max_steps: int, epsilon: float,
    hidden: int,
) -> Rollout:
    """Plan one episode from a random start in ``env``, the expert labelling every state (:func:`expert_sweep`).

    ``weights`` None: the expert takes its own choice (a demonstration). Otherwise a network with these weights
    acts, masked greedy with an ``epsilon`` share of random admissible actions. A start that already scores the
    maximum asks nothing of the policy, so another is drawn. Deterministic in ``episode_seed`` and ``weights``.
    """
    started = time.perf_counter()
    rng = np.random.default_rng(episode_seed)
    optimisations = 0
    while True:
        obs, info = env.reset(seed=int(rng.integers(2**31)))
        optimisations += 1
        if info["score"] < info["max_score"] - SCORE_TOLERANCE:
            break
    policy = None
    if weights is not None:
        q_net = QNetwork(int(env.observation_space.shape[0]), int(env.action_space.n), hidden)
        q_net.load_state_dict(weights)
        q_net.eval()
        policy = greedy_policy(q_net, env)
    rows: list[tuple[np.ndarray, int, float, np.ndarray, bool, bool]] = []
    initial, steps = float(info["score"]), 0
    while steps < max_steps:
        best, outcomes = expert_sweep(env)
        optimisations += len(outcomes)
        rows.extend((obs, a, r, next_obs, term, a == best) for a, r, next_obs, term in outcomes)
        if policy is None:
            action = best
        elif rng.random() < epsilon:
            action = int(rng.choice([a for a, *_ in outcomes]))
        else:
            action = policy(obs)
        obs, _r, terminated, truncated, info = env.step(action)  # reuses the preview: no optimisation
        steps += 1
        if terminated or truncated:
            break
    return Rollout(
        kind="demo" if weights is None else "rollout", case_id=str(info["case_id"]), initial_score=initial,
        final_score=float(info["score"]), steps=steps, optimisations=optimisations,
        env_seconds=time.perf_counter() - started,
        obs=np.array([r[0] for r in rows], dtype=np.float32), action=np.array([r[1] for r in rows], dtype=np.int64),
        reward=np.array([r[2] for r in rows], dtype=np.float32),
        next_obs=np.array([r[3] for r in rows], dtype=np.float32),
        terminal=np.array([r[4] for r in rows], dtype=np.float32),
        expert=np.array([r[5] for r in rows], dtype=np.float32),
    )


_ACTOR_ENV: PlanningEnv | None = None


def _actor_setup(make_env: Callable[[], PlanningEnv], torch_threads: int) -> None:
    global _ACTOR_ENV
    torch.set_num_threads(torch_threads)
    set_product_threads(torch_threads)  # the dij products' threads (same results on any number)
    _ACTOR_ENV = make_env()


def _actor_rollout(*args: Any) -> Rollout:
    assert _ACTOR_ENV is not None, "actor process not set up"
    return rollout(_ACTOR_ENV, *args)


class _InlineActors:
    """The actor pool's interface for ``workers = 0``: each episode runs when it is submitted, in this process."""

    def __init__(self, env: PlanningEnv) -> None:
        self.env = env

    def submit(self, *args: Any) -> Future[Rollout]:
        future: Future[Rollout] = Future()
        future.set_result(rollout(self.env, *args))
        return future

    def shutdown(self) -> None:
        """Nothing to stop."""


class _ProcessActors:
    """``workers`` processes, each with its own environment from ``make_env`` (picklable)."""

    def __init__(self, workers: int, make_env: Callable[[], PlanningEnv], torch_threads: int) -> None:
        # One BLAS thread per actor: OpenBLAS's extra thread spins between calls, and with an actor per core it took
        # a third of each core (measured: 37 % of a core beside 54 % of useful work). The variables must be set
        # before an actor imports numpy, so they are set here, for the processes this run spawns. The dij products'
        # threads are set in each actor instead (_actor_setup): numba refuses a changed NUMBA_NUM_THREADS in a process
        # whose threads already run, and this one may have run them.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(torch_threads)
        # spawn, not fork: the learner already holds torch's thread pools.
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_actor_setup, initargs=(make_env, torch_threads))

    def submit(self, *args: Any) -> Future[Rollout]:
        return self.pool.submit(_actor_rollout, *args)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class TrainingLog:
    """What a run did: per-episode results (env-step count at the end of each), validations and timings.
    ``env_seconds`` sums the actors' episode times, so with several workers it can exceed the wall time."""

    episodes: list[dict[str, Any]] = field(default_factory=list)
    validations: list[dict[str, Any]] = field(default_factory=list)
    env_steps: int = 0
    env_seconds: float = 0.0
    demo_episodes: int = 0
    rollout_episodes: int = 0
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
    return file_sha256(path)


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
    make_env: Callable[[], PlanningEnv],
    validation_env: PlanningEnv,
    validation_seeds: list[int],
    on_progress: Callable[[TrainingLog, str], None] | None = None,
) -> tuple[QNetwork, TrainingLog]:
    """Train on environments from ``make_env`` (one per actor; picklable when ``cfg.workers`` > 0) within
    ``cfg.wall_minutes``; return the best validated network and the run's log."""
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    deadline = started + 60.0 * cfg.wall_minutes
    demo_deadline = started + cfg.demo_fraction * (deadline - started)
    n_obs, n_actions = int(validation_env.observation_space.shape[0]), int(validation_env.action_space.n)
    q_net = QNetwork(n_obs, n_actions, cfg.hidden)
    target_net = QNetwork(n_obs, n_actions, cfg.hidden)
    target_net.load_state_dict(q_net.state_dict())
    optimizer = torch.optim.AdamW(q_net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    buffer = ReplayBuffer(cfg.buffer_size, n_obs)
    tlog = TrainingLog()
    best: tuple[tuple[float, float, float], dict[str, torch.Tensor]] | None = None
    episode_seeds = iter(range(cfg.seed * 1_000_003, cfg.seed * 1_000_003 + 10**6))

    def note(message: str) -> None:
        tlog.wall_seconds = time.perf_counter() - started
        if on_progress is not None:
            on_progress(tlog, message)

    def weights() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in q_net.state_dict().items()}

    def update(n: int) -> None:
        q_net.train()
        for _ in range(n):
            loss = dqn_loss(q_net, target_net, buffer.sample(rng, cfg.batch_size), cfg)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(q_net.parameters(), 10.0)
            optimizer.step()
            tlog.gradient_updates += 1
            if tlog.gradient_updates % cfg.target_update_interval == 0:
                target_net.load_state_dict(q_net.state_dict())
        q_net.eval()

    def validate() -> None:
        nonlocal best
        t0 = time.perf_counter()
        records = run_cohort(validation_env, greedy_policy(q_net, validation_env), validation_seeds)
        s = summarise(records)
        entry = {"env_steps": tlog.env_steps, "wall_s": time.perf_counter() - started, **s.as_dict(),
                 "seconds": time.perf_counter() - t0}
        tlog.validations.append(entry)
        key = (s.pct_at_max, s.final_mean, -s.steps_mean)
        if best is None or key > best[0]:
            best = (key, weights())
        log.info("drl_validation", **{k: round(v, 3) for k, v in entry.items()})
        note(f"validation: {s.final_mean:.2f}/{s.max_score:g}, {s.pct_at_max:.0f}% at max")

    def absorb(r: Rollout) -> None:
        for i in range(len(r.action)):
            buffer.add(r.obs[i], int(r.action[i]), float(r.reward[i]), r.next_obs[i], bool(r.terminal[i]),
                       expert=bool(r.expert[i]))
        tlog.env_steps += r.optimisations
        tlog.env_seconds += r.env_seconds
        if r.kind == "demo":
            tlog.demo_episodes += 1
        else:
            tlog.rollout_episodes += 1
        entry = {"kind": r.kind, "env_steps": tlog.env_steps, "case_id": r.case_id, "initial_score": r.initial_score,
                 "final_score": r.final_score, "steps": r.steps}
        tlog.episodes.append(entry)
        log.info("drl_episode", **entry)
        note(f"{r.kind} {len(tlog.episodes)}: {r.initial_score:.2f} → {r.final_score:.2f} in {r.steps} steps")

    pretrained = False

    def job() -> tuple[Any, ...]:
        if not pretrained:
            return (next(episode_seeds), None, cfg.demo_max_steps, 0.0, cfg.hidden)
        return (next(episode_seeds), weights(), cfg.rollout_max_steps, cfg.rollout_epsilon, cfg.hidden)

    actors: _InlineActors | _ProcessActors = (
        _InlineActors(make_env()) if cfg.workers <= 0 else _ProcessActors(cfg.workers, make_env, cfg.torch_threads)
    )
    since_validation = 0
    try:
        pending = {actors.submit(*job()) for _ in range(max(1, cfg.workers))}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                r = future.result()
                absorb(r)
                if r.kind == "rollout":
                    update(cfg.updates_per_state * r.steps)
                    since_validation += 1
            now = time.perf_counter()
            if not pretrained and now >= demo_deadline:
                update(cfg.pretrain_updates)
                pretrained = True
                validate()
            elif since_validation >= cfg.validate_every_episodes:
                since_validation = 0
                validate()
            if time.perf_counter() < deadline:
                pending |= {actors.submit(*job()) for _ in done}
            elif pretrained and not pending and tlog.rollout_episodes == 0:
                pending.add(actors.submit(*job()))  # at least one labelled rollout, however small the budget
    finally:
        actors.shutdown()
    if not pretrained:  # the deadline passed between the demonstration check and the resubmission
        update(cfg.pretrain_updates)
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
