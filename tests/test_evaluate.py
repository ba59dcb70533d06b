"""Evaluation: metrics on synthetic episode logs, episode planning (infeasible and unknown goals), and the evaluate and
figures notebooks run end to end under papermill on tiny inputs."""
import json, math, shutil, subprocess

import numpy as np
import pandas as pd
import pytest

from teduo.babyai import World, Goal, encode_state, achieved, goal_feasible, reset_layout, synthetic_instructions
from teduo.collect import start_episode
from teduo.core import write_json, write_jsonl, read_json
from teduo.evaluate import summarize, make_episodes, run_episodes, load_goals, load_selections, build_agent
from teduo.figures import fixture_outputs, table1, pct, QUADRANTS, AGENT_NAMES
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORLD = World()


# ---------------------------------------------------------------- metrics

def _log():
    rows = []
    # agent a, quadrant q1: 4 episodes (3 successes), go to: 2, open: 2
    for cat, ok, steps, inv in [('go to', True, 4, 0), ('go to', False, 10, 5), ('open', True, 2, 0), ('open', True, 6, 1)]:
        rows.append(dict(agent='a', quadrant='q1', category=cat, success=ok, steps=steps, invalid_actions=inv))
    # agent a, quadrant q2: 2 failures
    rows += [dict(agent='a', quadrant='q2', category='open', success=False, steps=8, invalid_actions=8)] * 2
    # agent b, quadrant q1: 1 success out of 3
    rows += [dict(agent='b', quadrant='q1', category='go to', success=s, steps=st, invalid_actions=0)
             for s, st in [(True, 3), (False, 9), (False, 9)]]
    return pd.DataFrame(rows)


def test_summarize_success_rate_se_lengths_and_invalid_rate():
    s = summarize(_log()).set_index(['agent', 'quadrant'])
    assert list(s.index) == [('a', 'q1'), ('a', 'q2'), ('b', 'q1')]
    r = s.loc[('a', 'q1')]
    assert r.episodes == 4 and r.success_rate == 0.75 and r.success_se == pytest.approx(math.sqrt(.75*.25/4))
    assert r.mean_length == 5.5 and r.mean_length_success == 4.0 and r.invalid_action_rate == pytest.approx(6/22)
    r = s.loc[('a', 'q2')]
    assert r.success_rate == 0 and r.success_se == 0 and math.isnan(r.mean_length_success) and r.invalid_action_rate == 1.0
    r = s.loc[('b', 'q1')]
    assert r.success_rate == pytest.approx(1/3) and r.success_se == pytest.approx(math.sqrt(2/9/3)) and r.mean_length_success == 3
    c = summarize(_log(), ('agent', 'quadrant', 'category')).set_index(['agent', 'quadrant', 'category'])
    assert c.loc[('a', 'q1', 'go to')].success_rate == 0.5 and c.loc[('a', 'q1', 'open')].success_rate == 1.0
    assert c.loc[('a', 'q1', 'open')].invalid_action_rate == pytest.approx(1/8) and c.episodes.sum() == len(_log())


def test_summarize_never_divides_by_zero_steps():
    log = pd.DataFrame([dict(agent='a', quadrant='q', category='open', success=True, steps=0, invalid_actions=0)])
    assert summarize(log).iloc[0].invalid_action_rate == 0.0


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
                                   'success', 'steps', 'invalid_actions']
    assert (ep.agent == 'random').all() and (ep.quadrant == 'custom').all()
    assert ep.goal.tolist() == [s.goal.goal for s in specs] and ep.instruction.tolist() == [s.goal.instruction for s in specs]
    assert ep.layout_seed.tolist() == [s.layout_seed for s in specs] and ep.episode_seed.tolist() == [s.episode_seed for s in specs]
    assert ep.category.tolist() == ['go to', 'go to', 'open', 'open']
    assert ep.steps.between(1, 8).all() and (ep.steps[~ep.success] == 8).all() and (ep.invalid_actions == 0).all()
    summary = pd.read_csv(tmp_path/'eval'/'summary.csv')
    assert len(summary) == 1 and summary.episodes[0] == 4 and summary.success_rate[0] == pytest.approx(ep.success.mean())
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
    for f in ('table1', 'label_audit', 'finetune_curves', 'rollouts', 'timing'):
        assert (out/'figures'/f'{f}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n', f
    for f in ('table1', 'categories', 'table2_ablations', 'label_audit', 'pipeline_stats'):
        assert (out/'tables'/f'{f}.md').read_text().startswith('| '), f
    t = read_json(tmp_path/'timing.json')  # the stages' own records plus the figures stage itself
    assert set(t['stages']) == {'collect', 'label', 'figures'} and t['stages']['collect'] == 12.5 and t['stages']['label'] == 100.0
    assert t['stages']['figures'] > 0 and t['total_s'] == round(sum(t['stages'].values()), 1)
    summary = pd.read_csv(fx/'eval'/'summary.csv')
    t1 = (out/'tables'/'table1.md').read_text().splitlines()
    assert t1[0] == '| agent | ' + ' | '.join(QUADRANTS) + ' |'
    row = summary[(summary.agent == 'teduo') & (summary.quadrant == QUADRANTS[0])].iloc[0]
    assert t1[2].startswith(f"| {AGENT_NAMES['teduo']} | {pct(row.success_rate, row.success_se)} |")
    assert t1[3].startswith(f"| {AGENT_NAMES['random']} |") and len(t1) == 4


def test_table1_formats_percent_with_standard_error():
    s = pd.DataFrame({'agent': ['random', 'teduo'], 'quadrant': [QUADRANTS[0]]*2, 'success_rate': [0.25, 0.5],
                      'success_se': [0.1, float('nan')]})
    t = table1(s)
    assert t.agent.tolist() == [AGENT_NAMES['teduo'], AGENT_NAMES['random']]  # paper order, not alphabetical
    assert t[QUADRANTS[0]].tolist() == ['50.0', '25.0 ± 10.0'] and pct(None) == 'n/a'
