"""DQN pieces: the DQfD margin loss, the replay buffer, and a tiny end-to-end run with checkpoint and advice."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from support.synthetic import make_env

from m2m.agents.drl.advisor import Advisor
from m2m.agents.drl.dqn import (
    DqnConfig,
    QNetwork,
    ReplayBuffer,
    checkpoint_meta,
    dqn_loss,
    expert_sweep,
    load_checkpoint,
    rollout,
    save_checkpoint,
    train,
)
from m2m.agents.drl.evaluate import run_episode, summarise, table


class FixedQ(QNetwork):
    """Q(s) = the same row for every state."""

    def __init__(self, row: list[float]) -> None:
        super().__init__(1, len(row), 1)
        self.row = torch.tensor(row)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.row.expand(obs.shape[0], -1)


def batch(action: int, reward: float, expert: float) -> dict[str, torch.Tensor]:
    return {"obs": torch.zeros(1, 1), "action": torch.tensor([action]), "reward": torch.tensor([reward]),
            "next_obs": torch.zeros(1, 1), "terminal": torch.tensor([1.0]), "expert": torch.tensor([expert])}


@pytest.mark.parametrize(("action", "expected"), [(0, 0.0), (1, 0.7), (2, 1.2)])
def test_margin_loss_penalises_actions_below_the_best_plus_margin(action: int, expected: float) -> None:
    q = FixedQ([1.0, 0.5, 0.0])
    cfg = DqnConfig(margin=0.2)
    # A terminal transition whose reward equals Q(s, a) has no TD error, so only the margin term remains.
    loss = dqn_loss(q, q, batch(action, float(q.row[action]), expert=1.0), cfg)
    assert float(loss) == pytest.approx(expected)
    assert float(dqn_loss(q, q, batch(action, float(q.row[action]), expert=0.0), cfg)) == pytest.approx(0.0)


def test_double_dqn_target_bootstraps_non_terminal_transitions() -> None:
    q = FixedQ([1.0, 3.0])
    target = FixedQ([2.0, 0.5])
    b = batch(0, 0.5, expert=0.0)
    b["terminal"] = torch.tensor([0.0])
    # target = 0.5 + 0.9 · Q_target(s', argmax_a Q(s', a) = 1) = 0.95; error 0.05 → Huber 0.5·0.05².
    assert float(dqn_loss(q, target, b, DqnConfig(gamma=0.9))) == pytest.approx(0.5 * 0.05**2)


def test_replay_buffer_wraps_around() -> None:
    buf = ReplayBuffer(3, 2)
    for i in range(5):
        buf.add(np.full(2, i), i % 2, float(i), np.full(2, i + 1), i == 4, expert=i == 3)
    assert buf.size == 3
    assert sorted(buf.reward.tolist()) == [2.0, 3.0, 4.0]
    sample = buf.sample(np.random.default_rng(0), 16)
    assert set(sample["reward"].tolist()) <= {2.0, 3.0, 4.0}
    assert torch.equal(sample["expert"], (sample["reward"] == 3.0).float())


def test_expert_sweep_picks_the_best_previewed_reward_among_admissible_actions() -> None:
    env = make_env()
    env.reset(seed=4)
    env.reset(seed=4, options={"tpps": env.tpps.with_value("t_ptv", 1.0)})  # lowering t_ptv is a no-op here
    best, outcomes = expert_sweep(env)
    assert [a for a, *_ in outcomes] == list(np.flatnonzero(env.action_masks()))
    assert 1 not in [a for a, *_ in outcomes] and 0 in [a for a, *_ in outcomes]
    by_action = {a: r for a, r, _, _ in outcomes}
    assert by_action[best] == max(by_action.values())


def test_rollout_labels_the_policys_states_with_the_experts_choice() -> None:
    env = make_env(step_cap=3)
    n_obs, n_actions = int(env.observation_space.shape[0]), int(env.action_space.n)
    net = QNetwork(n_obs, n_actions, 8)
    demo = rollout(env, 11, None, 2, 0.0, 8)
    policy = rollout(env, 11, net.state_dict(), 3, 0.0, 8)
    for r in (demo, policy):
        assert len(r.action) == len(r.reward) == len(r.obs) == len(r.expert) > 0
        # One expert label per labelled state, and the label is the best previewed reward of that state.
        states = np.unique(r.obs, axis=0, return_inverse=True)[1].ravel()
        for s in np.unique(states):
            rows = states == s
            assert r.expert[rows].sum() == 1
            assert r.reward[rows][r.expert[rows] == 1][0] == r.reward[rows].max()
    assert demo.kind == "demo" and policy.kind == "rollout"
    assert demo.steps <= 2 and policy.steps <= 3
    # The same seed starts from the same state, whoever acts.
    np.testing.assert_array_equal(demo.obs[0], policy.obs[0])


def test_tiny_training_run_checkpoint_and_advice(tmp_path: Path) -> None:
    env, val_env = make_env(step_cap=3), make_env(step_cap=3)
    cfg = DqnConfig(wall_minutes=0.03, workers=0, demo_max_steps=2, pretrain_updates=20, rollout_max_steps=3,
                    validate_every_episodes=3, batch_size=8, hidden=16, updates_per_state=2)
    q_net, tlog = train(cfg, partial(make_env, 3), val_env, [1, 2])
    assert tlog.demo_episodes >= 1 and tlog.rollout_episodes >= 1 and len(tlog.validations) >= 2
    assert tlog.gradient_updates >= cfg.pretrain_updates + cfg.updates_per_state
    roles = {"ptv": "ptv", "oar1": "bladder", "oar2": "rectum"}
    meta = checkpoint_meta(cfg, env, roles, tlog)
    assert meta["tpp_roles"][3:6] == ["t_oar1", "lambda_oar1", "v_oar1"]
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, q_net, meta)
    loaded, loaded_meta = load_checkpoint(path)
    obs, _ = env.reset(seed=0)
    x = torch.as_tensor(obs)[None]
    torch.testing.assert_close(loaded(x), q_net(x))
    advisor = Advisor(loaded, loaded_meta)
    advice = advisor.advise(obs, k=4, labels=roles)
    q = advisor.q_values(obs)
    assert [a.action for a in advice] == list(np.argsort(-q)[:4])
    assert advice[0].probability >= advice[-1].probability and sum(a.probability for a in advice) <= 1.0 + 1e-9
    assert advice[0].label == advice[0].tpp.replace("oar1", "bladder").replace("oar2", "rectum")
    only = np.zeros(env.action_space.n, dtype=bool)
    only[[2, 5]] = True
    masked = advisor.advise(obs, k=4, mask=only)
    assert sorted(a.action for a in masked) == [2, 5]
    assert sum(a.probability for a in masked) == pytest.approx(1.0)
    assert advisor.act(obs, mask=only) in (2, 5)
    record = run_episode(val_env, advisor.act, 1)
    assert record.steps <= 3
    val_env.reset(seed=0, options={"case_seed": 2})
    greedy = advisor.lookahead_policy(val_env, 1)(obs)
    assert greedy == advisor.act(obs)
    state_obs = val_env.observe(val_env._state().plan, val_env.tpps)
    full = advisor.lookahead_policy(val_env, val_env.action_space.n)(state_obs)
    rewards = [val_env.preview(a).reward for a in range(val_env.action_space.n)]
    assert rewards[full] == max(rewards)
    assert "| cohort |" in table({"synthetic": summarise([record])})


def test_training_with_actor_processes_learns_from_their_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The spawned actors unpickle this test package's env factory, so they need the repository on their path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    val_env = make_env(step_cap=3)
    cfg = DqnConfig(wall_minutes=0.12, workers=2, demo_max_steps=2, pretrain_updates=20, rollout_max_steps=3,
                    validate_every_episodes=4, batch_size=8, hidden=16, updates_per_state=2)
    _q_net, tlog = train(cfg, partial(make_env, 3), val_env, [1, 2])
    assert tlog.demo_episodes >= 1 and tlog.rollout_episodes >= 1
    # Every episode's optimisations came back from the actors and were counted.
    assert tlog.env_steps == tlog.episodes[-1]["env_steps"] > 0
    assert tlog.gradient_updates >= cfg.pretrain_updates + cfg.updates_per_state * tlog.rollout_episodes
