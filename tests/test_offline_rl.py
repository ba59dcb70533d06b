"""Step 2, offline RL on the abstract MDPs (P-hat, Q-learning against hand-solved MDPs and the loop reference, DQN and
filtered BC shapes), and the step-2 -> step-3 data: greedy rollouts, SFT rows and their files."""
import json

import numpy as np
import pytest

from teduo.babyai import World, ACTIONS
from teduo.core import write_jsonl
from teduo.collect import plan_episodes, collect_episodes, episodes_to_table, save_transitions, load_transitions
from teduo.abstract import make_abstractions
from teduo.label import hindsight_labels, save_labels, load_labels
from teduo.offline_rl import (empirical_mdp, stack_mdps, q_learning, q_learning_reference, greedy_actions, dqn,
                              filtered_bc, save_policies, load_policies, solve_goals, policy_report)
from teduo.sft_data import rollout, most_likely_next, sft_examples, split_examples
from teduo.policy_prompt import parse_actions, format_actions, POLICY_SYSTEM

G = 0.7
NA = len(ACTIONS)


def random_mdp(seed, S=25, N=220, n_goals=3):
    "Random transitions (repeated (s, a) pairs lead to different next states) and a few rewarded states."
    r = np.random.default_rng(seed)
    s = r.integers(S, size=N); a = r.integers(NA, size=N)
    s2 = np.where(r.random(N) < 0.6, (s + r.integers(-2, 3, size=N)) % S, r.integers(S, size=N))
    reward = np.zeros(S); reward[r.choice(S, n_goals, replace=False)] = 1
    return s, a, s2, reward


# ---------------------------------------------------------------- P-hat and Q-learning

def test_empirical_mdp_estimates_stochastic_transitions():
    s, a, s2 = [0, 0, 0, 0, 2, 1, 0], [2, 2, 2, 2, 5, 2, 0], [1, 1, 1, 2, 2, 3, 0]
    m = empirical_mdp(s, a, s2, reward=[0, 0, 0, 1])
    assert m.n_states == 4 and m.sa_s.tolist() == [0, 0, 1, 2] and m.sa_a.tolist() == [0, 2, 2, 5]
    np.testing.assert_allclose(m.P.toarray(), [[1, 0, 0, 0], [0, .75, .25, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert m.n_sa.tolist() == [1, 4, 1, 1] and m.reward.dtype == float and m.reward.tolist() == [0, 0, 0, 1]
    np.testing.assert_allclose(np.asarray(m.P.sum(1)).ravel(), 1)
    assert empirical_mdp(s, a, s2, [0]*10, n_states=10).P.shape == (4, 10)


def test_q_learning_matches_a_hand_solved_mdp():
    """Chain 0 -> 1 -> 2 -> 3 (goal) with action 2, self-loops with action 0, from 4 action 2 reaches 1 or the goal
    with probability 1/2 each, and the goal state leads back to 2 (a goal state ends the episode: nothing after it
    counts): Q(s, a) = E[r(s') + gamma (1 - r(s')) max Q(s', .)]."""
    s  = [0, 1, 2, 0, 1, 2, 4, 4, 3]
    a  = [2, 2, 2, 0, 0, 0, 2, 2, 2]
    s2 = [1, 2, 3, 0, 1, 2, 1, 3, 2]
    q, info = q_learning(empirical_mdp(s, a, s2, reward=[0, 0, 0, 1, 0]), tol=1e-13)
    exact = np.full((5, NA), np.nan)
    exact[[0, 1, 2], 2] = [G**2, G, 1.0]
    exact[[0, 1, 2], 0] = [G**3, G**2, G]
    exact[4, 2] = 0.5*(G*G) + 0.5*1.0
    exact[3, 2] = G  # leaving the goal: no reward on arrival in 2, then 2 -> 3 is worth 1
    np.testing.assert_array_equal(np.isnan(q), np.isnan(exact))
    np.testing.assert_allclose(q, exact, atol=1e-6, rtol=0)
    assert info['converged'] and info['pairs'] == 8 and info['max_dq'] < 1e-13
    assert greedy_actions(q).tolist() == [2, 2, 2, 2, 2]


@pytest.mark.parametrize('seed', range(3))
def test_q_learning_equals_the_loop_reference_on_random_stochastic_mdps(seed):
    s, a, s2, reward = random_mdp(seed)
    q, info = q_learning(empirical_mdp(s, a, s2, reward, len(reward)), tol=1e-10)
    ref = q_learning_reference(s.tolist(), a.tolist(), s2.tolist(), reward.tolist(), len(reward), tol=1e-10)
    np.testing.assert_array_equal(np.isnan(q), np.isnan(ref))
    np.testing.assert_allclose(q, ref, atol=1e-6, rtol=0)
    assert info['converged'] and np.nanmax(q) > 0.3, 'the random MDP must let some states reach a goal'
    # and the fixed point: Q = P (r + gamma (1 - r) V)
    m = empirical_mdp(s, a, s2, reward, len(reward))
    v = np.where(np.isnan(q), -np.inf, q).max(1); v[~np.isfinite(v)] = 0
    np.testing.assert_allclose(q[m.sa_s, m.sa_a], m.P @ (reward + G*(1 - reward)*v), atol=1e-6)


def test_goals_solved_together_equal_each_solved_alone():
    mdps = [empirical_mdp(*random_mdp(seed, S=15 + 5*seed), n_states=15 + 5*seed) for seed in range(4)]
    together, info = q_learning(mdps, tol=1e-12)
    assert isinstance(together, list) and len(together) == 4
    for m, q in zip(mdps, together):
        alone, _ = q_learning(m, tol=1e-12)
        assert q.shape == (m.n_states, NA)
        np.testing.assert_array_equal(np.isnan(q), np.isnan(alone))
        np.testing.assert_allclose(q, alone, atol=1e-8, rtol=0)
    big, so, po = stack_mdps(mdps)
    assert big.n_states == sum(m.n_states for m in mdps) and so.tolist()[-1] == big.n_states
    assert po[-1] == len(big.sa_s) and big.P.shape == (po[-1], so[-1])


def test_greedy_actions_ignore_unobserved_actions():
    q = np.full((4, NA), np.nan)
    q[0, 1] = -0.5                  # the only observed action, even if negative, beats every unobserved one
    q[1, [2, 4]] = [0.3, 0.3]       # ties -> lowest action
    q[2, [0, 6]] = [0.1, 0.9]
    assert greedy_actions(q).tolist() == [1, 2, 6, -1]


# ---------------------------------------------------------------- greedy rollouts for SFT

@pytest.mark.parametrize('seed', range(12))
def test_rollouts_stop_at_goals_and_never_loop(seed):
    s, a, s2, reward = random_mdp(100 + seed)
    m = empirical_mdp(s, a, s2, reward, len(reward)); q, _ = q_learning(m, tol=1e-9)
    nxt, greedy = most_likely_next(m), greedy_actions(q)
    outcomes = []
    for start in range(len(reward)):
        outcome, states, acts = rollout(q, nxt, reward, start, max_len=12)
        outcomes.append(outcome)
        assert (outcome == 'at_goal') == bool(reward[start]) and len(acts) <= 12
        for i, act in enumerate(acts):
            assert act == greedy[states[i]] and nxt[(states[i], act)] == states[i + 1]
        if outcome == 'success':
            assert reward[states[-1]] and not reward[states[:-1]].any(), 'a plan ends at the first labeled goal state'
            assert len(set(states)) == len(states) and len(acts) == len(states) - 1
        elif outcome == 'loop':
            assert states[-1] in states[:-1] and not reward[states].any()
        elif outcome == 'dead_end':
            assert greedy[states[-1]] < 0 or (states[-1], int(greedy[states[-1]])) not in nxt
        elif outcome == 'cap':
            assert len(acts) == 12 and len(set(states)) == len(states)
    assert 'success' in outcomes


def test_most_likely_next_breaks_ties_to_the_lowest_state():
    m = empirical_mdp([0, 0, 0, 0, 1], [2, 2, 2, 2, 3], [3, 1, 3, 1, 4], reward=[0]*5)
    assert most_likely_next(m) == {(0, 2): 1, (1, 3): 4}


# ---------------------------------------------------------------- a small end-to-end run: labels -> policies -> SFT rows

WORLD = World()
GOALS = ['go to a key', 'open a door', 'pick up a ball']


def _pipeline(tmp, tag, n=50):
    "Collect, label (oracle), solve, save policies and SFT files; returns the paths and objects."
    d = tmp/tag; d.mkdir()
    specs = plan_episodes(n, list(range(8)), {'bot': 0.7, 'random': 0.3}, 0)
    save_transitions(episodes_to_table(collect_episodes(WORLD, specs, 24, 0.0, progress=False), WORLD), d/'t.parquet')
    data = load_transitions(d/'t.parquet')
    save_labels(hindsight_labels(data, GOALS, make_abstractions(GOALS, 'oracle'), WORLD.room_size, 'oracle', None, 0, 0), d/'labels', 'oracle')
    labeled = load_labels(d/'labels')
    tables, info = solve_goals(labeled, data.actions, data.episode, 'q_learning', 'reward_oracle')
    save_policies(tables, labeled, {'algorithm': 'q_learning', 'goals': [lg.info for lg in labeled]}, d/'q.parquet')
    ex, stats = sft_examples(data, labeled, tables, 'reward_oracle', WORLD, max_plan_len=16, intermediate=True, seed=0,
                             replay_per_goal=3)
    train, val = split_examples(ex, 40, 0.25, seed=0)
    write_jsonl(train, d/'train.jsonl'); write_jsonl(val, d/'validation.jsonl')
    return dict(dir=d, data=data, labeled=labeled, tables=tables, examples=ex, stats=stats, train=train, val=val)


@pytest.fixture(scope='module')
def run(tmp_path_factory): return _pipeline(tmp_path_factory.mktemp('offline'), 'a')


def test_policies_round_trip(run):
    tables, meta = load_policies(run['dir']/'q.parquet')
    assert meta['algorithm'] == 'q_learning' and len(tables) == len(GOALS)
    for t, u, lg in zip(tables, run['tables'], run['labeled']):
        assert t.shape == (len(lg.states), NA)
        np.testing.assert_array_equal(np.isnan(t), np.isnan(u))
        np.testing.assert_allclose(t, u, rtol=1e-6, atol=1e-7)  # stored as float32
    with pytest.raises(FileNotFoundError, match='no policies'): load_policies(run['dir']/'missing.parquet')
    rep = policy_report(run['tables'], run['labeled'], 'reward_oracle')
    assert [r['instruction'] for r in rep] == GOALS and all(0 <= r['share_states_reaching_goal'] <= 1 for r in rep)


def test_sft_examples_follow_the_greedy_plans(run):
    ex, stats = run['examples'], run['stats']
    assert ex and stats['plans'] > 0 and stats['replayed'] <= 3*len(GOALS)
    for e in ex:
        k, sid = e['meta']['goal_index'], e['meta']['abstract_id']
        acts = parse_actions(e['completion'][0]['content'])
        assert e['completion'][0]['content'] == format_actions(acts) and len(acts) == e['meta']['plan_len'] >= 1
        assert acts[0] == greedy_actions(run['tables'][k])[sid]
        assert not run['labeled'][k].reward_oracle[sid], 'no example starts at a goal state'
        assert e['prompt'][0] == {'role': 'system', 'content': POLICY_SYSTEM} and e['prompt'][1]['role'] == 'user'
        assert e['prompt'][1]['content'].endswith(f"Goal: {e['meta']['goal']}")
    keys = [(e['meta']['goal_index'], e['meta']['abstract_id']) for e in ex]
    assert len(keys) == len(set(keys)), 'one example per (goal, abstract state)'


def test_split_examples_is_a_stratified_partition(run):
    ex, train, val = run['examples'], run['train'], run['val']
    ids = lambda rows: [json.dumps(r, sort_keys=True) for r in rows]
    assert len(train) + len(val) == min(40, len(ex)) and not set(ids(train)) & set(ids(val))
    assert set(ids(train + val)) <= set(ids(ex))
    assert {e['meta']['goal_index'] for e in train + val} == {e['meta']['goal_index'] for e in ex}
    a, b = split_examples(ex, 40, 0.25, seed=0)
    assert (a, b) == (train, val)
    a, b = split_examples(ex, None, 0.0, seed=0)
    assert len(a) == len(ex) and b == []


def test_split_keeps_each_plan_on_one_side_and_heldout_plans_are_unused(run):
    "Validation holds whole plans (no plan has states on both sides); held-out examples come from plans neither side used."
    from teduo.sft_data import heldout_examples
    ex = run['examples']
    plan = lambda e: (e['meta']['goal_index'], e['meta']['plan'])
    by_plan = {}
    for e in ex: by_plan.setdefault(plan(e), []).append(e)
    assert max(map(len, by_plan.values())) > 1, 'the fixture must have plans of several examples for this test to mean anything'
    for n, share in ((40, 0.25), (None, 0.3), (len(ex) // 2, 0.5)):
        train, val = split_examples(ex, n, share, seed=0)
        assert val and train and not {plan(e) for e in train} & {plan(e) for e in val}, (n, share)
        assert len(train) + len(val) == (n or len(ex))
        assert len(val) >= round(share * (n or len(ex)))  # whole plans: at least the share, never a plan split to reach it
        held = heldout_examples(ex, train + val, 10**6, seed=0)
        used = {plan(e) for e in train + val}
        assert not {plan(e) for e in held} & used
        assert len(held) == len({plan(e) for e in held}) == len(set(by_plan) - used), 'one example of every unused plan'
        assert heldout_examples(ex, train + val, 3, seed=0) == heldout_examples(ex, train + val, 3, seed=0)
        assert len(heldout_examples(ex, train + val, 3, seed=0)) == min(3, len(held))
    assert heldout_examples(ex, ex, 5, seed=0) == []  # every plan used: nothing to hold out


def test_states_per_plan_spreads_the_budget_over_more_plans(run):
    "states_per_plan k keeps k seeded states of each plan (in plan order): the same budget covers more plans, still split by plan."
    ex = run['examples']
    plan = lambda e: (e['meta']['goal_index'], e['meta']['plan'])
    sizes = {}
    for e in ex: sizes[plan(e)] = sizes.get(plan(e), 0) + 1
    assert max(sizes.values()) > 2, 'the fixture needs plans longer than 2 states'
    all_t, all_v = split_examples(ex, 30, 0.2, seed=0)
    t, v = split_examples(ex, 30, 0.2, seed=0, states_per_plan=2)
    assert len(t) + len(v) == 30 and not {plan(e) for e in t} & {plan(e) for e in v}
    per = {}
    for e in t + v: per.setdefault(plan(e), []).append(e)
    assert max(map(len, per.values())) <= 2 and len(per) > len({plan(e) for e in all_t + all_v})
    for k, es in per.items():  # the kept states of a plan are its states, in plan order
        mine = [e for e in ex if plan(e) == k]
        assert [mine.index(e) for e in es] == sorted(mine.index(e) for e in es)
    assert split_examples(ex, 30, 0.2, seed=0, states_per_plan=2) == (t, v), 'seeded'
    assert split_examples(ex, 30, 0.2, seed=0, states_per_plan=None) == (all_t, all_v)


def test_sft_files_load_with_datasets_as_prompt_completion_rows(run, tmp_path):
    import datasets
    ds = datasets.load_dataset('json', data_files={'train': str(run['dir']/'train.jsonl'),
                                                   'validation': str(run['dir']/'validation.jsonl')}, cache_dir=str(tmp_path))
    assert len(ds['train']) == len(run['train']) and len(ds['validation']) == len(run['val'])
    for split in ('train', 'validation'):
        assert set(ds[split].column_names) == {'prompt', 'completion', 'meta'}
    row = ds['train'][0]
    assert [m['role'] for m in row['prompt']] == ['system', 'user'] and [m['role'] for m in row['completion']] == ['assistant']
    assert set(row['prompt'][0]) == {'role', 'content'}
    parse_actions(row['completion'][0]['content'])


def test_two_runs_give_identical_policy_and_sft_bytes(run, tmp_path):
    b = _pipeline(tmp_path, 'b')
    for f in ('labels/states.parquet', 'labels/transitions.parquet', 'q.parquet', 'train.jsonl', 'validation.jsonl'):
        assert (run['dir']/f).read_bytes() == (b['dir']/f).read_bytes(), f


# ---------------------------------------------------------------- DQN and filtered BC

def test_dqn_and_filtered_bc_tables(run):
    data, lg = run['data'], run['labeled'][0]
    seen = np.zeros((len(lg.states), NA), bool); seen[lg.s, data.actions] = True
    q = dqn(lg, data.actions, hidden=16, steps=60, batch=64, seed=0)
    assert q.shape == (len(lg.states), NA)
    np.testing.assert_array_equal(np.isnan(q), ~seen)
    assert np.isfinite(q[seen]).all()
    bc = filtered_bc(lg, data.actions, data.episode, hidden=16, epochs=5, seed=0)
    assert bc.shape == (len(lg.states), NA)
    covered = ~np.isnan(bc).all(1)
    assert covered.any() and (np.isnan(bc[~covered]).all()) and np.isfinite(bc[covered]).all()
    np.testing.assert_allclose(np.exp(bc[covered]).sum(1), 1, atol=1e-5)  # log-probabilities of the 7 actions
    tables, info = solve_goals(run['labeled'][:2], data.actions, data.episode, 'dqn', 'reward_oracle', dqn_kw=dict(hidden=8, steps=10))
    assert len(tables) == 2 and info == {'algorithm': 'dqn'}
    with pytest.raises(ValueError, match='expected q_learning, dqn or filtered_bc'):
        solve_goals(run['labeled'][:1], data.actions, data.episode, 'sarsa', 'reward_oracle')


@pytest.mark.parametrize('fmt', [('egocentric', 'words', 'next'), ('coords', 'words', 'plan'), ('egocentric', 'ids', 'plan')])
def test_sft_examples_in_every_policy_format_answer_the_plan(run, fmt):
    "Each format writes the same examples (same goals, states, plans); its answers parse back to the plan (next: its first action)."
    from teduo.policy_prompt import PolicyFormat, parse_answer_prefix, policy_system
    from teduo.abstract import egocentric_text
    f = PolicyFormat(*fmt)
    ex, _ = sft_examples(run['data'], run['labeled'], run['tables'], 'reward_oracle', WORLD, max_plan_len=16, intermediate=True,
                         seed=0, replay_per_goal=3, fmt=f)
    base = run['examples']
    assert [e['meta'] for e in ex] == [e['meta'] for e in base]
    for e, b in zip(ex, base):
        acts = e['meta']['actions']
        assert acts == parse_actions(b['completion'][0]['content']) and len(acts) == e['meta']['plan_len']
        assert parse_answer_prefix(e['completion'][0]['content'], f) == (acts[:1] if f.answer == 'next' else acts)
        assert e['prompt'][0]['content'] == policy_system(f)
        if f.state == 'egocentric':
            lg = run['labeled'][e['meta']['goal_index']]
            assert e['prompt'][1]['content'] == f"State:\n{egocentric_text(lg.states[e['meta']['abstract_id']], WORLD.room_size)}\nGoal: {e['meta']['goal']}"
            assert '(' not in e['prompt'][1]['content'].split('In front')[0].replace('(closed)', '').replace('(open)', '').replace('(locked)', '')


def test_an_example_without_a_plan_id_is_refused_not_counted_apart(run):
    from teduo.sft_data import heldout_examples
    ex = [dict(e, meta={k: v for k, v in e['meta'].items() if k != 'plan'}) if i == 0 else e for i, e in enumerate(run['examples'])]
    with pytest.raises(ValueError, match='meta.goal_index and meta.plan'): split_examples(ex, 40, 0.25, seed=0)
    with pytest.raises(ValueError, match='meta.goal_index and meta.plan'): heldout_examples(run['examples'], ex[:1], 5, seed=0)
