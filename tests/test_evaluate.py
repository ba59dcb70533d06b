"""Evaluation: metrics on synthetic episode logs, episode planning (infeasible and unknown goals), and the evaluate and
figures notebooks run end to end under papermill on tiny inputs."""
import json, math, shutil, subprocess

import numpy as np
import pandas as pd
import pytest

from teduo.babyai import World, Goal, encode_state, achieved, goal_feasible, reset_layout, synthetic_instructions
from teduo.collect import start_episode
from teduo.core import write_json, write_jsonl, read_json
from teduo.core import wilson_interval
from teduo.evaluate import summarize, compare_agents, make_episodes, run_episodes, load_goals, load_selections, build_agent
from teduo.figures import fixture_outputs, table1, category_table, pct, rate_cell, QUADRANTS, AGENT_NAMES
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORLD = World()


# ---------------------------------------------------------------- metrics

def _log():
    rows = []
    # agent a, quadrant q1: 4 episodes (3 successes), go to: 2, open: 2
    for cat, ok, steps, inv, ne in [('go to', True, 4, 0, 1), ('go to', False, 10, 5, 2), ('open', True, 2, 0, 0), ('open', True, 6, 1, 0)]:
        rows.append(dict(agent='a', quadrant='q1', category=cat, success=ok, steps=steps, unparseable_steps=inv, no_effect_actions=ne,
                         answers=steps, unparseable_answers=inv))
    # agent a, quadrant q2: 2 failures
    rows += [dict(agent='a', quadrant='q2', category='open', success=False, steps=8, unparseable_steps=8, no_effect_actions=0,
                  answers=8, unparseable_answers=8)] * 2
    # agent b, quadrant q1: 1 success out of 3, no LLM answers
    rows += [dict(agent='b', quadrant='q1', category='go to', success=s, steps=st, unparseable_steps=0, no_effect_actions=st,
                  answers=0, unparseable_answers=0) for s, st in [(True, 3), (False, 9), (False, 9)]]
    return pd.DataFrame(rows)


def test_summarize_counts_rates_intervals_lengths_and_waste():
    s = summarize(_log()).set_index(['agent', 'quadrant'])
    assert list(s.index) == [('a', 'q1'), ('a', 'q2'), ('b', 'q1')]
    r = s.loc[('a', 'q1')]
    assert (r.episodes, r.successes) == (4, 3) and r.success_rate == 0.75
    assert (r.wilson_low, r.wilson_high) == pytest.approx(wilson_interval(3, 4))
    assert r.mean_length == 5.5 and r.mean_length_success == 4.0 and r.unparseable_step_rate == pytest.approx(6/22)
    assert r.no_effect_rate == pytest.approx(3/22) and r.unparseable_answer_rate == pytest.approx(6/22)
    r = s.loc[('a', 'q2')]
    assert r.success_rate == 0 and r.wilson_low == 0 and r.wilson_high > 0.5 and math.isnan(r.mean_length_success)
    assert r.unparseable_step_rate == 1.0 and (r.bootstrap_low, r.bootstrap_high) == (0.0, 0.0)
    r = s.loc[('b', 'q1')]
    assert r.success_rate == pytest.approx(1/3) and r.mean_length_success == 3 and r.no_effect_rate == 1.0
    assert math.isnan(r.unparseable_answer_rate), 'an agent that answers no text has no unparseable-answer rate'
    c = summarize(_log(), ('agent', 'quadrant', 'category')).set_index(['agent', 'quadrant', 'category'])
    assert c.loc[('a', 'q1', 'go to')].success_rate == 0.5 and c.loc[('a', 'q1', 'open')].success_rate == 1.0
    assert c.loc[('a', 'q1', 'open')].unparseable_step_rate == pytest.approx(1/8) and c.episodes.sum() == len(_log())


def test_summarize_never_divides_by_zero_steps():
    log = pd.DataFrame([dict(agent='a', quadrant='q', category='open', success=True, steps=0, unparseable_steps=0, no_effect_actions=0)])
    r = summarize(log).iloc[0]
    assert r.unparseable_step_rate == 0.0 and r.no_effect_rate == 0.0 and math.isnan(r.unparseable_answer_rate)


def _synthetic(outcomes:dict)->pd.DataFrame:
    "An episode log of one agent and quadrant: {goal: [success, ...]}."
    return pd.DataFrame([dict(agent='a', quadrant='q', goal=g, success=bool(x), steps=8) for g, xs in outcomes.items() for x in xs])


Z = 1.959964


def test_wilson_intervals_on_synthetic_logs_with_known_answers():
    none = summarize(_synthetic({f'g{i}': [0]*3 for i in range(4)})).iloc[0]  # 0/12: the "0.0 ± 0.0"
    assert (none.episodes, none.successes, none.wilson_low) == (12, 0, 0.0)
    assert none.wilson_high == pytest.approx(Z**2/(12 + Z**2)) == pytest.approx(0.2425, abs=1e-4)
    all_ = summarize(_synthetic({f'g{i}': [1]*3 for i in range(4)})).iloc[0]  # 12/12
    assert all_.wilson_high == 1.0 and all_.wilson_low == pytest.approx(12/(12 + Z**2))
    some = summarize(_synthetic({'g0': [1, 1, 1], 'g1': [1, 1, 0], 'g2': [0, 0, 0], 'g3': [0, 0, 0]})).iloc[0]  # 5/12
    assert (some.wilson_low, some.wilson_high) == pytest.approx((0.19326, 0.68049), abs=1e-5)
    assert rate_cell(some.successes, some.episodes) == '41.7 [19.3, 68.0] (n=12)'


def test_goal_clustered_bootstrap_on_synthetic_logs_with_known_answers():
    same = summarize(_synthetic({f'g{i}': [1, 0] for i in range(5)})).iloc[0]  # every goal 1/2: every resample is 0.5
    assert (same.bootstrap_low, same.bootstrap_high) == (0.5, 0.5)
    split = summarize(_synthetic({'g0': [1]*3, 'g1': [1]*3, 'g2': [0]*3, 'g3': [0]*3})).iloc[0]
    # 4 goals, 2 always solved: a resample of 4 goals has all-failed or all-solved goals with probability 1/16 each (> 2.5%)
    assert (split.bootstrap_low, split.bootstrap_high) == (0.0, 1.0) and (split.wilson_low, split.wilson_high) == pytest.approx((0.2538, 0.7462), abs=1e-4)
    by_goal = summarize(_synthetic({'g0': [1, 0, 1, 0], 'g1': [1]*4}), ('agent', 'goal')).set_index('goal')  # episodes are the clusters
    assert by_goal.loc['g0'].bootstrap_low < 0.5 < by_goal.loc['g0'].bootstrap_high and by_goal.loc['g1'].bootstrap_low == 1.0
    log = _synthetic({f'g{i}': np.random.default_rng(i).integers(2, size=5).tolist() for i in range(6)})
    a, b = summarize(log), summarize(log)  # seeded: the same intervals every run
    assert a.equals(b) and a.bootstrap_low[0] <= a.success_rate[0] <= a.bootstrap_high[0]


def test_teduo_is_tested_against_each_agent_per_quadrant():
    base = _synthetic({'g0': [1, 1, 1, 1], 'g1': [1, 1, 1, 1], 'g2': [0, 0, 1, 1]}).assign(layout_seed=0, episode_seed=list(range(12)))
    other = base.assign(agent='random', success=[False]*12)
    fewer = base.iloc[:6].assign(agent='tabular', success=True)  # not the same episodes: unpaired
    t = compare_agents(pd.concat([base.assign(agent='teduo'), other, fewer, base.assign(agent='teduo', quadrant='q2')]))
    assert set(t) == {'q'} and set(t['q']) == {'random', 'tabular'}, 'a quadrant without another agent has no test'
    r = t['q']['random']
    assert (r['test'], r['a_only'], r['b_only'], r['episodes'], r['successes']) == ('exact McNemar', 10, 0, [12, 12], [10, 0])
    assert r['p_value'] == pytest.approx(2 * 0.5**10, abs=1e-6)  # two-sided: 10 discordant pairs, all for TEDUO
    assert t['q']['tabular']['test'] == "Fisher's exact" and t['q']['tabular']['table'] == [[10, 2], [6, 0]]
    assert compare_agents(other) == {}, 'no TEDUO episodes: no tests'


def test_run_episodes_counts_unparseable_steps_and_moves_without_effect_apart():
    from teduo.agent import Agent, LLMAgent
    from teduo.llm import LLM, LLMConfig
    from fakes import ScriptedBackend
    class Fixed(Agent):
        def __init__(self, a): self.a, self.name = a, f'always {a}'
        def act(self, states, goals, idx): return np.full(len(idx), self.a), np.zeros(len(idx), bool)
    specs, _ = make_episodes(WORLD, 'q', ['go to the tile (1,1)'], LAYOUTS, 2, seed=0)
    done, _ = run_episodes(Fixed(6), specs, WORLD, max_steps=5, progress=False)   # `done`: never changes the state
    turn, _ = run_episodes(Fixed(0), specs, WORLD, max_steps=5, progress=False)   # turning always does
    assert (done.no_effect_actions == 5).all() and (turn.no_effect_actions == 0).all()
    assert (done.unparseable_steps == 0).all() and (done.answers == 0).all()
    llm = LLMAgent(LLM(LLMConfig('scripted'), None, backend=ScriptedBackend(lambda c: 'no')), {}, WORLD.room_size, retries=1)
    garbage, _ = run_episodes(llm, specs, WORLD, max_steps=5, progress=False)
    assert (garbage.unparseable_steps == 5).all() and (garbage.no_effect_actions == 0).all(), 'a no-op of an unparseable step is not a move'
    assert (garbage.answers == 10).all() and (garbage.unparseable_answers == 10).all() and (garbage.retries == 5).all()


# ---------------------------------------------------------------- episode planning

LAYOUTS = [0, 1, 2, 3]


def _infeasible_goal():
    "The first Synth instruction none of LAYOUTS can host (objects absent)."
    env = WORLD.make_env(); first = [encode_state(reset_layout(env, l)) for l in LAYOUTS]
    for ins in synthetic_instructions(WORLD)['pickup'] + synthetic_instructions(WORLD)['putnext']:
        if not any(goal_feasible(s, ins) for s in first): return ins
    raise AssertionError('every goal fits these layouts: pick others')


def test_make_episodes_skips_and_lists_goals_without_a_feasible_layout():
    bad = _infeasible_goal()
    goals = ['go to a key', bad, {'goal': 'unlock a portal', 'instruction': 'open a door'}]
    specs, skipped = make_episodes(WORLD, 'q', goals, LAYOUTS, 3, seed=0)
    assert skipped == [bad], 'an infeasible goal is listed, never dropped silently'
    assert len(specs) == 2*3 and [s.goal.instruction for s in specs] == ['go to a key']*3 + ['open a door']*3
    assert specs[3].goal.goal == 'unlock a portal'
    env = WORLD.make_env()
    for sp in specs:
        assert sp.quadrant == 'q' and sp.layout_seed in LAYOUTS
        assert goal_feasible(encode_state(reset_layout(env, sp.layout_seed)), sp.goal)
        assert np.array_equal(sp.start, encode_state(start_episode(env, sp.layout_seed, sp.episode_seed)))
        assert not achieved(sp.start, sp.goal)
    again, _ = make_episodes(WORLD, 'q', goals, LAYOUTS, 3, seed=0)
    assert [(s.layout_seed, s.episode_seed) for s in again] == [(s.layout_seed, s.episode_seed) for s in specs]
    other, _ = make_episodes(WORLD, 'q', goals, LAYOUTS, 3, seed=1)
    assert [s.episode_seed for s in other] != [s.episode_seed for s in specs]


@pytest.mark.parametrize('goal,msg', [('fly to the moon', 'unknown action'), ('go to the tile (4,4)', 'impossible'),
                                      ('go to the tile (30,2)', 'impossible'), ('pick up the pink ball', 'unknown colour'),
                                      ('open the red ball', 'only doors')])
def test_make_episodes_refuses_unknown_or_impossible_goals(goal, msg):
    with pytest.raises(ValueError, match=msg): make_episodes(WORLD, 'q', ['go to a key', goal], LAYOUTS, 1, seed=0)


def test_goal_files_with_repeated_or_no_goals_are_refused(tmp_path):
    p = tmp_path/'goals.jsonl'
    write_jsonl([{'goal': 'find a key', 'instruction': 'go to a key'}, {'goal': 'open a door', 'instruction': 'open a door'},
                 {'goal': 'find a key', 'instruction': 'go to a key'}], p)
    with pytest.raises(ValueError, match=rf"{p}: goal 'find a key' is listed 2 times \(1 goals repeated\)"): load_goals(p)
    p.write_text('\n')
    with pytest.raises(ValueError, match=rf'{p}: no goals'): load_goals(p)
    write_jsonl([{'goal': 'find a key', 'instruction': 'go to a key'}, {'goal': 'get a key', 'instruction': 'go to a key'}], p)
    assert [g.goal for g in load_goals(p)] == ['find a key', 'get a key'], 'paraphrases of one instruction are two goals'


@pytest.mark.parametrize('goals,layouts,eps,msg', [
    (['go to a key', 'open a door', 'go to a key'], LAYOUTS, 2, "quadrant 'q': goal 'go to a key' is listed 2 times"),
    ([], LAYOUTS, 2, "quadrant 'q': no goals"), (['go to a key'], [], 2, "quadrant 'q': no layouts"),
    (['go to a key'], LAYOUTS, 0, 'episodes_per_goal: got 0, expected an integer >= 1'),
    (['go to a key'], LAYOUTS, -1, 'episodes_per_goal: got -1')])
def test_make_episodes_refuses_repeated_goals_empty_lists_and_no_episodes(goals, layouts, eps, msg):
    with pytest.raises(ValueError, match=msg): make_episodes(WORLD, 'q', goals, layouts, eps, seed=0)


def test_run_episodes_refuses_a_step_limit_below_one():
    from teduo.agent import RandomAgent
    specs, _ = make_episodes(WORLD, 'q', ['go to a key'], LAYOUTS, 1, seed=0)
    with pytest.raises(ValueError, match='max_steps: got 0, expected an integer >= 1'):
        run_episodes(RandomAgent(0), specs, WORLD, max_steps=0, progress=False)


# ---------------------------------------------------------------- step-2 policies against their labels and abstractions

TRAIN = ['go to a key', 'open a door']


def _labels(d, tag, goals, abstractions, seed):
    "Collected data (seeded) labeled by the oracle, saved as a label folder; (folder, labeled goals, data)."
    from teduo.collect import plan_episodes, collect_episodes, episodes_to_table, save_transitions, load_transitions
    from teduo.label import hindsight_labels, save_labels, load_labels
    specs = plan_episodes(30, LAYOUTS, {'bot': 0.7, 'random': 0.3}, seed)
    save_transitions(episodes_to_table(collect_episodes(WORLD, specs, 24, 0.0, progress=False), WORLD), d/f't{seed}.parquet')
    data = load_transitions(d/f't{seed}.parquet')
    out = d/tag
    save_labels(hindsight_labels(data, goals, [a for a in abstractions if a['goal'] in goals], WORLD.room_size, 'oracle', None, 0, 0), out, 'oracle')
    return out, load_labels(out), data


@pytest.fixture(scope='module')
def step2(tmp_path_factory):
    "A policies folder (q_learning_llm) trained on labels of TRAIN, with its abstractions file."
    from teduo.abstract import make_abstractions
    from teduo.offline_rl import solve_goals, save_policies
    d = tmp_path_factory.mktemp('step2')
    abstractions = make_abstractions(TRAIN + ['pick up a ball'], 'oracle')
    write_json({'room_size': WORLD.room_size, 'abstractions': abstractions}, d/'abstractions.json')
    labels, labeled, data = _labels(d, 'labels', TRAIN, abstractions, 0)
    tables, _ = solve_goals(labeled, data.actions, data.episode, 'q_learning', 'reward')
    save_policies(tables, labeled, {'algorithm': 'q_learning', 'goals': [lg.info for lg in labeled]}, d/'policies'/'q_learning_llm.parquet')
    return dict(dir=d, abstractions=abstractions, inputs={'policies': str(d/'policies'), 'labels': str(labels), 'abstractions': str(d/'abstractions.json')})


def _tabular(inputs):
    return build_agent('tabular', {}, WORLD, inputs, {}, load_selections(inputs), 0)


def test_tabular_agent_from_matching_policies_labels_and_abstractions(step2):
    agent = _tabular(step2['inputs'])
    assert all(agent.knows(g) for g in TRAIN)
    specs, _ = make_episodes(WORLD, 'q', TRAIN, LAYOUTS, 2, seed=0)
    log, _ = run_episodes(agent, specs, WORLD, max_steps=16, progress=False)
    assert len(log) == 4


def test_policies_used_with_other_labels_or_abstractions_are_refused(step2):
    d, inputs = step2['dir'], step2['inputs']
    pol = d/'policies'/'q_learning_llm.parquet'
    other_goals, _, _ = _labels(d, 'reordered', TRAIN[::-1], step2['abstractions'], 0)  # the same data, goals in another order
    with pytest.raises(ValueError, match=rf"{pol} and {other_goals}: goal lists differ \(2 vs 2 goals; goal 0: .*'go to a key'.* vs .*'open a door'"):
        _tabular({**inputs, 'labels': str(other_goals)})
    fewer, _, _ = _labels(d, 'fewer', TRAIN[:1], step2['abstractions'], 0)
    with pytest.raises(ValueError, match=r'goal lists differ \(2 vs 1 goals; goal 1'): _tabular({**inputs, 'labels': str(fewer)})
    other_data, _, _ = _labels(d, 'other-data', TRAIN, step2['abstractions'], 1)  # same goals, labels of another collect run
    with pytest.raises(ValueError, match=rf"{pol} and {other_data}: goal 0 \('go to a key'\): the policies' \d+ abstract states differ"):
        _tabular({**inputs, 'labels': str(other_data)})
    relabeled = d/'relabeled'; shutil.copytree(inputs['labels'], relabeled)  # same rows, another label run's fields
    meta = read_json(relabeled/'goals.json'); meta['goals'][1]['n_llm_labels'] += 1; write_json(meta, relabeled/'goals.json')
    with pytest.raises(ValueError, match=r"goal 1 \('open a door'\): label fields \['n_llm_labels'\] differ"):
        _tabular({**inputs, 'labels': str(relabeled)})
    ab = [dict(a, selection=None) if a['goal'] == 'open a door' else a for a in step2['abstractions']]
    write_json({'room_size': WORLD.room_size, 'abstractions': ab}, d/'other_abstractions.json')
    with pytest.raises(ValueError, match=rf"{d/'other_abstractions.json'} and {inputs['labels']}: goal 'open a door' has selection None"):
        _tabular({**inputs, 'abstractions': str(d/'other_abstractions.json')})
    with pytest.raises(ValueError, match=r"None and .*: goal 'go to a key' has selection None in the abstractions"):
        _tabular({**inputs, 'abstractions': None})


# ---------------------------------------------------------------- notebooks under papermill

@pytest.fixture
def nb_env(monkeypatch, tmp_path):
    "Jupyter/IPython/matplotlib state in a temporary folder; the kernel imports this checkout's teduo."
    for k in ('JUPYTER_CONFIG_DIR', 'JUPYTER_DATA_DIR', 'IPYTHONDIR', 'MPLCONFIGDIR'):
        (tmp_path/k).mkdir(); monkeypatch.setenv(k, str(tmp_path/k))
    monkeypatch.setenv('PYTHONPATH', str(ROOT))


def _status():
    return subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=ROOT, capture_output=True, text=True).stdout


def _run(nb, out, **parameters):
    import papermill as pm
    return pm.execute_notebook(str(ROOT/'nbs'/nb), str(out), parameters=parameters, cwd=str(ROOT), kernel_name='python3',
                               progress_bar=False, log_output=False)


def test_evaluate_notebook_on_a_goal_file(nb_env, tmp_path):
    goals = [{'goal': 'find a key', 'instruction': 'go to a key'}, {'goal': 'open a door', 'instruction': 'open a door'}]
    write_jsonl(goals, tmp_path/'goals.jsonl')
    before = _status()
    _run('09_evaluate.ipynb', tmp_path/'09.ipynb', goals_file=str(tmp_path/'goals.jsonl'), layout_seeds=LAYOUTS,
         agents=['random'], episodes_per_goal=2, max_steps=8, out_dir=str(tmp_path/'eval'))
    assert _status() == before, 'the run wrote into the repository'
    ep = pd.read_csv(tmp_path/'eval'/'episodes.csv')
    specs, skipped = make_episodes(WORLD, 'custom', goals, LAYOUTS, 2, seed=0)  # the notebook's defaults: seed 0, World()
    assert not skipped and len(ep) == len(specs) == 4
    assert ep.columns.tolist() == ['agent', 'quadrant', 'goal', 'instruction', 'category', 'layout_seed', 'episode_seed',
                                   'bot_steps', 'success', 'gave_up', 'steps', 'unparseable_steps', 'no_effect_actions', 'answers', 'unparseable_answers', 'retries', 'loop_asks']
    assert (ep.agent == 'random').all() and (ep.quadrant == 'custom').all()
    assert ep.goal.tolist() == [s.goal.goal for s in specs] and ep.instruction.tolist() == [s.goal.instruction for s in specs]
    assert ep.layout_seed.tolist() == [s.layout_seed for s in specs] and ep.episode_seed.tolist() == [s.episode_seed for s in specs]
    assert ep.category.tolist() == ['go to', 'go to', 'open', 'open']
    assert ep.steps.between(1, 8).all() and (ep.steps[~ep.success] == 8).all() and (ep.unparseable_steps == 0).all()
    summary = pd.read_csv(tmp_path/'eval'/'summary.csv')
    assert len(summary) == 1 and summary.episodes[0] == 4 and summary.success_rate[0] == pytest.approx(ep.success.mean())
    assert summary.successes[0] == ep.success.sum() and summary.wilson_low[0] <= summary.success_rate[0] <= summary.wilson_high[0]
    assert set(pd.read_csv(tmp_path/'eval'/'categories.csv').category) == {'go to', 'open'}
    assert (tmp_path/'eval'/'rollouts.parquet').exists()


@pytest.mark.parametrize('bad', ['episodes_per_goal', 'repeated_goal'])
def test_evaluate_notebook_refuses_zero_counts_and_repeated_goals(nb_env, tmp_path, bad):
    import papermill as pm
    goals = [{'goal': 'find a key', 'instruction': 'go to a key'}] * (2 if bad == 'repeated_goal' else 1)
    write_jsonl(goals, tmp_path/'goals.jsonl')
    kw = {'episodes_per_goal': 2, 'max_steps': 8}
    if bad != 'repeated_goal': kw[bad] = 0  # 0 once fell back to the params' value (`x or default`)
    with pytest.raises(pm.PapermillExecutionError) as e:
        _run('09_evaluate.ipynb', tmp_path/'09.ipynb', goals_file=str(tmp_path/'goals.jsonl'), layout_seeds=LAYOUTS,
             agents=['random'], out_dir=str(tmp_path/'eval'), **kw)
    want = f"{tmp_path/'goals.jsonl'}: goal 'find a key' is listed 2 times" if bad == 'repeated_goal' else f'evaluate.{bad}: got 0'
    assert want in str(e.value) and not (tmp_path/'eval').exists()


def test_figures_notebook_on_fixture_outputs(nb_env, tmp_path):
    fx = fixture_outputs(tmp_path/'fx')
    out = tmp_path/'out'
    before = _status()
    _run('10_figures.ipynb', tmp_path/'10.ipynb', figures=dict(eval_dir=str(fx/'eval'), metrics_dir=str(fx/'metrics'),
         out_dir=str(out), timing_out=str(tmp_path/'timing.json'), frames_per_strip=4))
    assert _status() == before, 'the run wrote into the repository'
    for f in ('figures/table1', 'figures/label_audit', 'figures/finetune_curves', 'figures/rollouts', 'timing'):
        assert (out/f'{f}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f  # the timing plot sits outside figures/
    assert not (out/'figures'/'timing.png').exists(), 'a timing record among the results would make make compare fail'
    for f in ('table1', 'categories', 'table2_ablations', 'label_audit', 'pipeline_stats'):
        assert (out/'tables'/f'{f}.md').read_text().startswith('| '), f
    t = read_json(tmp_path/'timing.json')  # the stages' own records plus the figures stage itself
    assert set(t['stages']) == {'collect', 'label', 'figures'} and t['stages']['collect'] == 12.5 and t['stages']['label'] == 100.0
    assert t['stages']['figures'] > 0 and t['total_s'] == round(sum(t['stages'].values()), 1)
    summary = pd.read_csv(fx/'eval'/'summary.csv')
    t1 = (out/'tables'/'table1.md').read_text().splitlines()
    assert t1[0] == '| agent | ' + ' | '.join(QUADRANTS) + ' |'
    row = summary[(summary.agent == 'teduo') & (summary.quadrant == QUADRANTS[0])].iloc[0]
    assert t1[2].startswith(f"| {AGENT_NAMES['teduo']} | {rate_cell(row.successes, row.episodes)} |")
    assert t1[3].startswith(f"| {AGENT_NAMES['random']} | 0.0 [0.0, ") and len(t1) == 4
    for f in ('table1', 'categories', 'table2_ablations'):
        text = (out/'tables'/f'{f}.md').read_text()
        assert '±' not in text and '(n=' in text, f


def test_table1_cells_carry_n_and_the_wilson_interval_never_plus_minus_zero():
    s = pd.DataFrame({'agent': ['random', 'teduo', 'gcbc'], 'quadrant': [QUADRANTS[0]]*3, 'successes': [0, 5, 12], 'episodes': [12, 12, 12]})
    t = table1(s, {'il': 'no baselines'})
    assert t.agent.tolist() == [AGENT_NAMES[a] for a in ('teduo', 'gcbc', 'random', 'il')]  # paper order; not-run rows last
    assert t[QUADRANTS[0]].tolist() == ['41.7 [19.3, 68.0] (n=12)', '100.0 [75.8, 100.0] (n=12)', '0.0 [0.0, 24.2] (n=12)',
                                        'not run (no baselines)']
    assert not any('±' in v for v in t[QUADRANTS[0]]) and pct(None) == 'n/a' and rate_cell(0, 0) == 'n/a'
    two = pd.concat([s, s.assign(quadrant=QUADRANTS[1])]).query("not (agent == 'gcbc' and quadrant == @QUADRANTS[1])")
    assert table1(two).set_index('agent').loc[AGENT_NAMES['gcbc'], QUADRANTS[1]] == 'n/a'
    cats = pd.DataFrame({'agent': 'teduo', 'quadrant': QUADRANTS[:2], 'category': 'open', 'successes': [0, 5], 'episodes': [6, 6]})
    assert category_table(cats).open.tolist() == ['41.7 [19.3, 68.0] (n=12)']  # pooled over quadrants


# ---------------------------------------------------------------- goal sensitivity: the bot's ceiling, goal-blind controls, starts

def test_the_bot_row_solves_go_to_pick_up_open_and_tile_goals():
    from teduo.agent import BotAgent
    env = WORLD.make_env()
    goals = ['go to the red ball', 'pick up a key', 'open a door', 'go to the tile (3,1)']
    feasible = [g for g in goals if any(goal_feasible(encode_state(reset_layout(env, l)), Goal.of(g)) for l in LAYOUTS)]
    assert 'go to the tile (3,1)' in feasible and len(feasible) >= 3
    specs, _ = make_episodes(WORLD, 'q', feasible, LAYOUTS, 3, seed=0)
    log, _ = run_episodes(BotAgent(WORLD, 0), specs, WORLD, max_steps=64, progress=False)
    assert log.success.mean() >= 0.9, log.groupby('goal').success.mean()
    assert log[log.goal == 'go to the tile (3,1)'].success.all(), 'the tile goal: face the tile, then step on it'


def test_min_bot_steps_redraws_starts_the_bot_solves_at_once():
    from teduo.evaluate import bot_path
    goals = ['go to a key', 'open a door']
    near, _ = make_episodes(WORLD, 'q', goals, LAYOUTS, 6, seed=0)
    far, _ = make_episodes(WORLD, 'q', goals, LAYOUTS, 6, seed=0, min_bot_steps=6, bot_cap=64)
    assert all(s.bot_steps is None for s in near)
    assert all(s.bot_steps is None or s.bot_steps >= 6 for s in far) and any(s.bot_steps for s in far)
    lens = [bot_path(WORLD, s.layout_seed, s.episode_seed, s.goal, 64) for s in near]
    assert min(l for l in lens if l) < 6, 'without the redraw some starts are a few actions from the goal'
    assert [s.index for s in far] == [0, 1, 2, 3, 4, 5]*2


def test_goal_shuffled_control_acts_on_another_goal_of_the_same_list():
    from teduo.agent import GoalShuffled, RandomAgent
    tr, te = ['go to a key', 'open a door', 'pick up a ball', 'go to a box'], ['go to the red ball', 'open the blue door']
    seen = []
    class Recorder(RandomAgent):
        def act(self, states, goals, idx): seen.extend(Goal.of(g).goal for g in goals); return super().act(states, goals, idx)
    ctl = GoalShuffled(Recorder(0), [tr, te], seed=0)
    assert all(ctl.swap[g].goal != g for g in tr + te), 'a derangement: no goal keeps its own'
    assert {ctl.swap[g].goal for g in tr} == set(tr) and {ctl.swap[g].goal for g in te} == set(te), 'within each list'
    assert GoalShuffled(RandomAgent(0), [tr, te], seed=0).swap == ctl.swap, 'seeded'
    specs, _ = make_episodes(WORLD, 'q', tr[:2], LAYOUTS, 1, seed=0)
    run_episodes(ctl, specs, WORLD, max_steps=2, progress=False)
    assert seen[:2] == [ctl.swap[s.goal.goal].goal for s in specs]


def test_an_agent_that_never_answers_gives_up_after_n_unparseable_steps():
    from teduo.agent import LLMAgent
    from teduo.llm import LLM, LLMConfig
    from fakes import ScriptedBackend
    be = ScriptedBackend(lambda c: 'I cannot say')
    agent = LLMAgent(LLM(LLMConfig('scripted'), None, backend=be), {}, WORLD.room_size, retries=1)
    specs, _ = make_episodes(WORLD, 'q', ['go to a key'], LAYOUTS, 2, seed=0)
    log, _ = run_episodes(agent, specs, WORLD, max_steps=20, give_up_after=3, progress=False)
    assert log.gave_up.all() and (log.steps == 3).all() and not log.success.any()
    assert (log.unparseable_steps == 3).all() and (log.answers == 6).all(), 'each step: an answer and one re-ask'
    s = summarize(log)
    assert s.gave_up_rate.tolist() == [1.0]


def test_table1_plot_takes_all_and_none_cells():
    "n/n and 0/n cells: the Wilson bound equals the rate up to float rounding; the error bars must not go negative."
    from teduo.figures import plot_table1
    s = pd.DataFrame({'agent': ['bot', 'random'], 'quadrant': QUADRANTS[0], 'successes': [200, 0], 'episodes': [200, 200]})
    fig = plot_table1(s)
    assert len(fig.axes[0].patches) == 2


def test_the_oracle_step_1_control_acts_with_its_own_adapter(tmp_path):
    "teduo_oracle reads evaluate.inputs.adapter_oracle (not TEDUO's adapter): untrained -> a reported 'not run', missing -> a named error."
    from teduo.evaluate import NotRun
    from teduo.finetune import write_untrained
    write_untrained(tmp_path/'adapter_oracle', 'sft_oracle/train.jsonl: no training examples')
    base = {'llm': {'policy': {'model': 'x'}}}
    with pytest.raises(NotRun, match='not trained: sft_oracle/train.jsonl'):
        build_agent('teduo_oracle', base, World(), {'adapter': tmp_path/'missing', 'adapter_oracle': tmp_path/'adapter_oracle'}, {}, {}, 0)
    with pytest.raises(ValueError, match='evaluate.inputs.adapter_oracle missing'):
        build_agent('teduo_oracle', base, World(), {'adapter': tmp_path/'adapter_oracle'}, {}, {}, 0)
    assert AGENT_NAMES['teduo_oracle'].startswith('TEDUO, oracle step 1')


def test_llm_episode_caps_are_one_number_or_one_per_agent():
    "`llm_episodes_per_cell`: one cap for every LLM agent, or {agent: cap} (an agent not named, or null: every episode)."
    from teduo.evaluate import llm_episodes
    per_goal = lambda n, k=None: -(-(k or 200) // n)  # a 200-episode cell, as the stage's per_goal
    caps = {'teduo': None, 'llm_in_context': 20}
    assert [llm_episodes(per_goal, 20, caps, a) for a in ('teduo', 'llm_in_context', 'llm_zero_shot')] == [10, 1, 10]
    assert llm_episodes(per_goal, 20, 40, 'teduo') == 2 and llm_episodes(per_goal, 20, None, 'teduo') == 10
    assert llm_episodes(per_goal, 20, 10_000, 'teduo') == 10  # never more than the cell holds
    with pytest.raises(ValueError, match=r'llm_episodes_per_cell\.llm_in_context'):
        llm_episodes(per_goal, 20, {'llm_in_context': 0}, 'llm_in_context')
