"TEDUO on WebShop: collection, labels, filtered behavioural cloning, agents and evaluation (no real model: scripted backends)."
import json

import numpy as np
import pandas as pd
import pytest

from teduo.llm import LLM, LLMConfig
from teduo.webshop.env import Shop, WebShopEnv
from teduo.webshop.collect import (View, behaviour_keywords, collect_trajectories, check_trajectories, load_trajectories,
                                   save_trajectories, state_from_json, goal_split)
from teduo.webshop.label import label_audit, pick_best, llm_p_yes, load_labels, save_labels, hindsight_rewards, purchases
from teduo.webshop.sft import remove_loops, filtered_demonstrations, sft_examples
from teduo.webshop.agent import parse_agent_action, run_episodes, LLMAgent, BehaviourAgent
from teduo.webshop.evaluate import episode_rows, summarize, results_table, episode_plan
from teduo.core import write_jsonl
from teduo.llm import ParseError

W = dict(product=1.0, option=2.0, buy=1.0, detail=0.3, next=0.2, prev=0.3, back=0.05)


@pytest.fixture(scope='module')
def shop(): return Shop(seed=42)


class Scripted:
    "Scripted generate backend: answers from a function of the chat."
    def __init__(self, f): self.f, self.calls = f, 0
    def generate(self, chats, max_new_tokens, temperature, seed, progress=False):
        self.calls += len(chats)
        return [(self.f(c, temperature, seed), 10, 3) for c in chats]


def scripted(f): return LLM(LLMConfig(model='scripted'), backend=Scripted(f))


# ---- collection
def test_collector_is_deterministic_and_unlabeled(shop, tmp_path):
    goals = np.array([1500, 1501, 1502])
    kws = [['men dress shirt', 'shirt'], ['polo'], ['pants', 'slim pants']]
    a = collect_trajectories(shop, goals, kws, seed=3, step_cap=15, view=View(), weights=W, progress=False)
    b = collect_trajectories(shop, goals, kws, seed=3, step_cap=15, view=View(), weights=W, progress=False)
    pd.testing.assert_frame_equal(a, b)
    save_trajectories(a, tmp_path/'a.parquet'); save_trajectories(b, tmp_path/'b.parquet')
    assert (tmp_path/'a.parquet').read_bytes() == (tmp_path/'b.parquet').read_bytes()  # identical bytes
    back = load_trajectories(tmp_path/'a.parquet')
    assert not [c for c in back.columns if 'reward' in c]
    states = [state_from_json(s) for s in back.state]
    assert all(s.reward is None for s in states)  # the purchase page's score is blanked
    assert back.terminal.any()
    assert not back[back.terminal].observation.str.contains(r'max 1\.0\) \[SEP\] [01]\.', regex=True).any()
    assert back.traj.nunique() == 5 and (back.groupby('traj').goal.first().tolist() == [1500, 1500, 1501, 1502, 1502])
    c = collect_trajectories(shop, goals, kws, seed=4, step_cap=15, view=View(), weights=W, progress=False)
    assert not c.action.equals(a.action)  # another seed, other clicks


def test_behaviour_keywords_one_generation_per_trajectory():
    seen = []
    def answer(chat, temperature, seed):
        seen.append((temperature, seed)); return f"query {temperature} {seed % 7}]"
    llm = scripted(answer)
    kws, fallbacks = behaviour_keywords(['Find me a', 'Find me b'], 'llm', llm, per_goal=3, temperature=0.5, seed=1)
    assert llm.backend.calls == 6 and fallbacks == 0
    assert [k[0] for k in kws] == ['query 0.0 0'] * 2  # first trajectory greedy
    assert len({k[1] for k in kws}) == 1 and kws[0][1] != kws[0][2]  # one seed per repetition
    kws2, _ = behaviour_keywords(['Find me a', 'Find me b'], 'llm', scripted(answer), per_goal=3, temperature=0.5, seed=1)
    assert kws2 == kws
    with pytest.raises(ValueError, match='keywords'): behaviour_keywords(['x'], 'bm25', None, 1)


def test_goal_split_and_bad_trajectories(tmp_path):
    with pytest.raises(ValueError, match='overlap'): goal_split(6910, {'start': 0, 'count': 10}, {'start': 9, 'count': 2})
    with pytest.raises(FileNotFoundError, match='webshop_collect'): load_trajectories(tmp_path/'none.parquet')
    df = pd.DataFrame({'traj': [0, 0], 'goal': [1, 1], 'rep': [0, 0], 'step': [0, 1], 'instruction': ['i'] * 2, 'keywords': ['k'] * 2,
                       'state': ['{}'] * 2, 'observation': ['o'] * 2, 'state_text': ['a', 'b'], 'action': ['search[k]', None],
                       'terminal': [False, True]})
    check_trajectories(df, 'x')
    with pytest.raises(ValueError, match="field 'terminal'"): check_trajectories(df.assign(terminal=[True, True]), 'x.parquet')
    with pytest.raises(ValueError, match="field 'goal'"): check_trajectories(df.assign(goal=[1, 2]), 'x.parquet')


# ---- labels
def test_label_audit_math():
    L = pd.DataFrame({'traj': [0, 1, 2, 3, 4, 5], 'goal': [0, 0, 1, 1, 2, 2], 'n_actions': [5, 3, 4, 4, 2, 6],
                      'label_reward': [.9, .9, .2, .7, .65, .1], 'true_reward': [1.0, .5, .8, .1, .6, 0.]})
    a = label_audit(L, 0.6)
    # truth >= .6: [1, 0, 1, 0, 1, 0]; labels >= .6: [1, 1, 0, 1, 1, 0] -> tp 2, fp 2, fn 1
    assert (a['precision'], a['recall'], a['f1']) == (0.5, round(2/3, 4), round(2*.5*(2/3)/(.5 + 2/3), 4))
    assert a['n_true'] == 3 and a['n_pred'] == 4 and a['true_success'] == 1
    assert a['pearson'] == round(float(np.corrcoef(L.label_reward, L.true_reward)[0, 1]), 4)
    from sklearn.metrics import roc_auc_score
    assert a['roc_auc'] == round(roc_auc_score(L.true_reward >= .6, L.label_reward), 4)
    pick = a['per_goal_pick']
    assert pick_best(L).traj.tolist() == [1, 3, 4]  # ties go to the shorter trajectory
    assert pick['true_reward_of_label_pick'] == round((.5 + .1 + .6) / 3, 4)
    assert pick['true_reward_of_best'] == round((1 + .8 + .6) / 3, 4)
    assert pick['label_pick_is_best_share'] == round(1/3, 4)


def test_judge_calibration_and_label_files(tmp_path):
    class Lean:
        def score(self, chats, choices, progress=False):
            l = np.array([0.5 if 'N/A' in c[-1]['content'] else (2.0 if 'good' in c[-1]['content'] else -1.0) for c in chats])
            return np.stack([-np.log1p(np.exp(-l)), -np.log1p(np.exp(l))], 1), [1] * len(chats)
    llm = LLM(LLMConfig(model='lean'), backend=Lean())
    p = llm_p_yes(['a', 'a', 'b'], ['good', 'bad', 'good'], llm, 'contextual', progress=False)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-np.array([1.5, -1.5, 1.5]))))
    L = pd.DataFrame({'traj': [0, 1], 'goal': [0, 0], 'n_actions': [3, 4], 'label_reward': [.2, .7], 'llm_p_yes': [.2, .7],
                      'true_reward': [0., 1.]})
    save_labels(L, tmp_path/'l.parquet')
    pd.testing.assert_frame_equal(load_labels(tmp_path/'l.parquet'), L, check_dtype=False)
    save_labels(L.assign(traj=[0, 0]), tmp_path/'bad.parquet')
    with pytest.raises(ValueError, match="field 'traj'"): load_labels(tmp_path/'bad.parquet')


def test_oracle_labels_are_the_true_reward(shop):
    goals = np.array([1500, 1501])
    data = collect_trajectories(shop, goals, [[shop.catalog.goals[g]['query']] * 2 for g in goals], seed=0, step_cap=15,
                                view=View(), weights=W, progress=False)
    L = hindsight_rewards(purchases(data), shop, 'oracle')
    assert len(L) == data.terminal.sum() and (L.label_reward == L.true_reward).all()
    env = WebShopEnv(shop=shop)  # the true reward equals what the environment paid on the purchase step
    for traj in L.traj:
        t = data[data.traj == traj]
        env.set_state(state_from_json(t.state.iloc[-2]))
        r = env.step(t.action.iloc[-2])[1]
        assert r == pytest.approx(float(L[L.traj == traj].true_reward.iloc[0]))


# ---- filtered behavioural cloning
def _toy_data():
    rows = []
    def traj(tid, goal, keys, actions):
        for k, (key, a) in enumerate(zip(keys, actions + [None])):
            rows.append(dict(traj=tid, goal=goal, rep=0, step=k, instruction=f'goal {goal}', keywords='q', state='{}',
                             observation='o', state_text=key, action=a, terminal=a is None))
    traj(0, 7, ['S', 'R', 'A', 'R', 'B', 'D'], ['search[q]', 'click[a]', 'click[< prev]', 'click[b]', 'click[buy now]'])
    traj(1, 7, ['S', 'R', 'C', 'D2'], ['search[q]', 'click[c]', 'click[buy now]'])
    traj(2, 8, ['S', 'R', 'E', 'D3'], ['search[q]', 'click[e]', 'click[buy now]'])
    traj(3, 9, ['S', 'R', 'F', 'D4'], ['search[q]', 'click[f]', 'click[buy now]'])
    return pd.DataFrame(rows)


def test_filtered_bc_keeps_best_removes_loops_applies_threshold():
    data = _toy_data()
    labels = pd.DataFrame({'traj': [0, 1, 2, 3], 'goal': [7, 7, 8, 9], 'n_actions': [5, 3, 3, 3],
                           'label_reward': [.9, .8, .59, .6], 'true_reward': [1., .2, .9, .3]})
    demo = filtered_demonstrations(data, labels, 0.6)
    assert set(demo.traj) == {0, 3}  # goal 7: the best-labeled (0); goal 8 falls under 0.6; goal 9 exactly 0.6
    t0 = demo[demo.traj == 0]
    assert t0.action.tolist() == ['search[q]', 'click[b]', 'click[buy now]']  # the detour via A is cut
    assert t0.state_text.tolist() == ['S', 'R', 'B']
    assert len(filtered_demonstrations(data, labels, 0.95)) == 0
    assert remove_loops(['S', 'R', 'A', 'S', 'R', 'B', 'D']) == [3, 4, 5, 6]


def test_sft_rows_are_prompt_completion_and_load_with_datasets(tmp_path):
    import datasets
    data = _toy_data()
    labels = pd.DataFrame({'traj': [0, 1, 2, 3], 'goal': [7, 7, 8, 9], 'n_actions': [5, 3, 3, 3],
                           'label_reward': [.9, .8, .7, .6], 'true_reward': [1., .2, .9, .3]})
    train, val = sft_examples(filtered_demonstrations(data, labels, 0.6), validation=0.34, seed=0)
    assert len(val) == 3 and len(train) == 6  # one goal of three held out (3 steps each)
    assert not {r['meta']['goal'] for r in train} & {r['meta']['goal'] for r in val}
    for r in train + val:
        assert [m['role'] for m in r['prompt']] == ['system', 'user'] and r['completion'][0]['role'] == 'assistant'
        assert parse_agent_action(r['completion'][0]['content']) == r['completion'][0]['content']
    write_jsonl(train, tmp_path/'train.jsonl'); write_jsonl(val, tmp_path/'validation.jsonl')
    ds = datasets.load_dataset('json', data_files={'train': str(tmp_path/'train.jsonl'), 'validation': str(tmp_path/'validation.jsonl')})
    assert ds['train'].num_rows == 6 and ds['validation'][0]['completion'][0]['role'] == 'assistant'
    assert set(ds['train'].column_names) == {'prompt', 'completion', 'meta'}


# ---- agents and evaluation
@pytest.mark.parametrize('text,marker,want', [
    ('click[buy now]', None, 'click[buy now]'),
    ('search[red running shoes]\nthanks', None, 'search[red running shoes]'),
    ('Thought: it matches.\nAction: click[b0123]', 'Action:', 'click[b0123]'),
    ('action: click[large]', 'Action:', 'click[large]')])
def test_parser_good(text, marker, want): assert parse_agent_action(text, marker) == want


@pytest.mark.parametrize('text', ['', 'buy it', 'click[buy now] now', 'Click the first one', 'search[]', 'click[[x]]',
                                  'Thought: only a thought', 'import os; click[x]'])
def test_parser_malformed(text):
    with pytest.raises(ParseError): parse_agent_action(text, 'Action:')


def test_invalid_actions_are_noops(shop):
    env0 = WebShopEnv(shop=shop); env0.reset(options={'goal': 5})
    start = env0.get_state()
    answers = iter(['what now?', 'click[buy now]', 'search[<a> x]', 'search[pillow]'])
    agent = LLMAgent(scripted(lambda c, t, s: next(answers)), 'plain', retry_temperature=0.7)
    logs = run_episodes(shop, [5], agent, max_steps=4, progress=False)
    log = logs[0]
    assert (log['steps'], log['invalid'], log['crashes'], log['bought']) == (4, 3, 1, False)
    assert log['actions'][:3] == ['<invalid> what now?', '<invalid> click[buy now]', '<invalid> search[<a> x]']
    assert log['actions'][3] == 'search[pillow]'
    # a greedy agent whose page does not change answers the same: with retry_temperature 0 it stays stuck
    stuck = LLMAgent(scripted(lambda c, t, s: 'no idea' if t == 0 else 'search[pillow]'), 'plain', retry_temperature=0.0)
    assert run_episodes(shop, [5], stuck, max_steps=3, progress=False)[0]['invalid'] == 3
    unstuck = LLMAgent(scripted(lambda c, t, s: 'no idea' if t == 0 else 'search[pillow]'), 'plain', retry_temperature=0.7)
    log = run_episodes(shop, [5], unstuck, max_steps=3, progress=False)[0]  # invalid, sampled retry searches, invalid
    assert log['invalid'] == 2 and log['actions'][1] == 'search[pillow]'
    assert start.page == 'search'


def test_lockstep_batches_one_call_per_step(shop):
    calls = []
    class Count:
        def generate(self, chats, max_new_tokens, temperature, seed, progress=False):
            calls.append(len(chats)); return [('search[shoes]', 5, 2)] * len(chats)
    agent = LLMAgent(LLM(LLMConfig(model='count'), backend=Count()), 'plain')
    logs = run_episodes(shop, [0, 1, 2, 3], agent, max_steps=2, progress=False)
    assert all(l['steps'] == 2 and l['invalid'] == 0 for l in logs)
    assert calls == [4, 4]  # one batched call per step (step 2 prompts differ from step 1: results pages)


def test_behaviour_agent_reproducible(shop):
    a = run_episodes(shop, [0, 1, 2], BehaviourAgent({0: 'pillow', 1: 'shirt', 2: 'rug'}, W), progress=False)
    b = run_episodes(shop, [0, 1, 2], BehaviourAgent({0: 'pillow', 1: 'shirt', 2: 'rug'}, W), progress=False)
    assert a == b and sum(l['invalid'] for l in a) == 0


def test_evaluation_metrics_on_synthetic_logs():
    logs = lambda rs, inv, steps: [dict(goal=i, reward=r, success=r == 1.0, bought=r > 0, steps=s, invalid=v, crashes=0, actions=[])
                                   for i, (r, v, s) in enumerate(zip(rs, inv, steps))]
    df = pd.DataFrame(episode_rows('teduo', 'train', logs([1.0, 0.5, 0.0, 0.3], [0, 1, 15, 0], [3, 5, 15, 4]))
                      + episode_rows('teduo', 'test', logs([0.0, 1.0], [2, 0], [15, 4]))
                      + episode_rows('behaviour', 'train', logs([0.2], [0], [6])))
    s = summarize(df)
    t = s['teduo']['train']
    assert (t['score'], t['success_rate'], t['invalid_rate'], t['bought_rate']) == (45.0, 25.0, round(100 * 16 / 27, 2), 75.0)
    assert s['teduo']['test']['score'] == 50.0 and s['teduo']['all']['episodes'] == 6
    assert s['teduo']['all']['invalid_rate'] == round(100 * 18 / 46, 2)
    # 95% intervals: Wilson for the success rate (1/4), a bootstrap over goals for the score (seeded: the same every run)
    assert t['success_interval'] == [4.56, 69.94] and t['score_interval'][0] < 45.0 < t['score_interval'][1]
    assert s['behaviour']['train']['score_interval'] == [20.0, 20.0], 'one episode: nothing to resample'
    assert summarize(df) == s and summarize(df, seed=1)['teduo']['train']['success_interval'] == [4.56, 69.94]
    md = results_table(s)
    lo, hi = t['score_interval']
    assert f'| fine-tuned LLM (TEDUO) | 45.0 [{lo:.1f}, {hi:.1f}] | 25.0 [4.6, 69.9] (n=4) |' in md  # n: the cell's episodes
    assert '| data-collection policy (LLM keywords + random clicks) | 20.0 [20.0, 20.0] | 0.0 [0.0, 79.3] (n=1) | - | - | 0.0 |' in md
    assert '95% Wilson interval' in md


def test_the_rule_reference_acts_validly_and_buys(shop):
    "The rule-based reference: search the instruction, top hit, the option values the instruction names, buy; never invalid."
    from teduo.webshop.agent import RuleAgent
    from teduo.webshop.evaluate import make_agent
    logs = run_episodes(shop, [0, 1, 2], RuleAgent(), progress=False)
    assert all(l['bought'] and l['invalid'] == 0 for l in logs)
    assert all(l['actions'][0] == f"search[{' '.join(shop.catalog.goals[g]['instruction_text'].split())}]" for g, l in zip([0, 1, 2], logs))
    assert all(l['actions'][-1] == 'click[buy now]' for l in logs)
    assert isinstance(make_agent('rule', {}, None, None, RuleAgent().view, {}, {'max_new_tokens': {}, 'retry_temperature': 0}, 0), RuleAgent)


@pytest.mark.parametrize('we,msg', [
    (dict(episodes=dict(train=0, test=2), max_steps=15), r'params.yaml:webshop_evaluate.episodes.train: got 0, expected an integer >= 1'),
    (dict(episodes=dict(train=2, test=-1), max_steps=15), r'webshop_evaluate.episodes.test: got -1'),
    (dict(episodes=dict(train=2, test=2), max_steps=0), r'params.yaml:webshop_evaluate.max_steps: got 0, expected an integer >= 1'),
    (dict(episodes=dict(train=2), max_steps=15), r"webshop_evaluate.episodes: missing keys \['test'\]"),
    (dict(episodes=dict(train=4, test=2), max_steps=15), r'more than the 3 training / 2 test goals')])
def test_evaluation_plan_refuses_empty_splits_and_zero_steps(we, msg):
    train, test = goal_split(20, {'start': 10, 'count': 3}, {'start': 0, 'count': 2})
    assert episode_plan(dict(episodes=dict(train=3, test=1), max_steps=15), train, test) == {'train': [10, 11, 12], 'test': [0]}
    with pytest.raises(ValueError, match=msg): episode_plan(we, train, test)
