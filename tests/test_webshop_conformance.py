"""Conformance of teduo.webshop with fixtures produced by the ORIGINAL WebShop code (shared/data/webshop/fixtures).

Prices/goals (seed 42), the 300 search queries (tokens, top-50 order, raw and tie-adjusted scores), the 409 reward
cases (reward and verbose info), and the 60 scripted episodes (every observation, available actions, reward, done);
plus bad-input checks. The figures are printed with `pytest -s`.
"""
import json, math
from pathlib import Path

import numpy as np
import pytest

from teduo.core import repo_root
from teduo.webshop.data import load_catalog, load_products, read_data, parse_price
from teduo.webshop.search import BM25Index, TooManyClauses, analyze
from teduo.webshop.reward import get_reward, attribute_reward, goal_option_values, option_reward, title_nouns
from teduo.webshop.env import WebShopEnv, Shop, ShopState, parse_action, OriginalCrash

FIX = repo_root().parent/'shared'/'data'/'webshop'/'fixtures'
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason=f"conformance fixtures not found at {FIX}")

def jsonl(name): return [json.loads(l) for l in (FIX/name).read_text(encoding='utf-8').splitlines() if l.strip()]

@pytest.fixture(scope='module')
def shop(): return Shop(seed=42)

# ---------------------------------------------------------------- products, prices, goals
@needs_fixtures
def test_prices_seed42(shop):
    want = json.loads((FIX/'product_prices_seed42.json').read_text())
    assert list(shop.catalog.prices) == list(want)
    assert shop.catalog.prices == want # exact floats

@needs_fixtures
def test_goals_seed42(shop):
    want = jsonl('goals_seed42.jsonl')
    got = shop.catalog.goals
    assert len(got) == len(want) == 6910
    for w in want:
        g = got[w['index']]
        assert {k: g[k] for k in w if k != 'index'} == {k: v for k, v in w.items() if k != 'index'}, w['index']

def test_seed_changes_prices_not_goal_order():
    a, b = load_catalog(42), load_catalog(1234)
    assert [g['asin'] for g in a.goals] == [g['asin'] for g in b.goals]
    assert a.prices != b.prices
    assert load_catalog(1234).prices == b.prices # determinism

# ---------------------------------------------------------------- search
@pytest.fixture(scope='module')
def search_report(shop):
    rows = []
    for q in jsonl('search_top50.jsonl'):
        r = shop.index.search(q['query'], 50)
        want_ids = [h[0] for h in q['hits']]
        top = want_ids[:10]
        overlap = len(set(r.asins[:10]) & set(top)) / len(top) if top else float(r.asins[:10] == [])
        same = r.asins == want_ids
        raw_err = float(np.max(np.abs(r.raw_scores.astype(float) - q['raw_scores']))) if same and want_ids else 0.0
        fin_err = float(np.max(np.abs(r.scores.astype(float) - [h[1] for h in q['hits']]))) if same and want_ids else 0.0
        rows.append(dict(q=q, r=r, overlap=overlap, top10=r.asins[:10] == top, top50=same, raw_err=raw_err,
                         fin_err=fin_err, tokens=r.tokens == q['tokens'], n=r.n_matching == q['n_matching']))
    n = len(rows)
    print(f"\nsearch: {n} queries | overlap@10 {np.mean([x['overlap'] for x in rows]):.4f} | exact top-10 "
          f"{sum(x['top10'] for x in rows)}/{n} | exact top-50 {sum(x['top50'] for x in rows)}/{n} | tokens "
          f"{sum(x['tokens'] for x in rows)}/{n} | n_matching {sum(x['n'] for x in rows)}/{n} | max raw score error "
          f"{max(x['raw_err'] for x in rows):.3g} | max final score error {max(x['fin_err'] for x in rows):.3g}")
    return rows

@needs_fixtures
def test_search_ranking(search_report):
    n = len(search_report)
    assert n == 300
    assert np.mean([x['overlap'] for x in search_report]) >= 0.99
    assert sum(x['top10'] for x in search_report) >= 0.9 * n
    bad = [x['q']['query'][:60] for x in search_report if not x['top50']]
    assert not bad, f"top-50 order differs for {len(bad)} queries, e.g. {bad[:3]}"

@needs_fixtures
def test_search_tokens_and_counts(search_report):
    assert all(x['tokens'] for x in search_report)
    assert all(x['n'] for x in search_report)

@needs_fixtures
def test_search_scores_bit_exact(search_report):
    assert max(x['raw_err'] for x in search_report) == 0.0
    assert max(x['fin_err'] for x in search_report) == 0.0

def test_search_bad_input(shop):
    with pytest.raises(TooManyClauses, match='at most 1024'): shop.index.search(' '.join(f'w{i}' for i in range(1025)))
    with pytest.raises(ValueError, match='k must be'): shop.index.search('shoes', 0)
    assert shop.index.search('').asins == [] and shop.index.search('!!!').n_matching == 0
    assert analyze('Shoes SHOES shoes') == ['shoe'] * 3

# ---------------------------------------------------------------- reward
@needs_fixtures
def test_rewards(shop):
    by_asin = shop.catalog.by_asin
    cases = jsonl('reward_cases.jsonl')
    errs, bad = [], []
    for c in cases:
        p = by_asin[c['purchased_asin']]
        assert {k: p[k] for k in c['purchased']} == c['purchased']
        reward, info = get_reward(p, c['goal'], c['price'], c['options'], verbose=True)
        errs.append(abs(reward - c['reward']))
        info_err = max(abs(info[k] - c['info'][k]) for k in c['info']) if set(info) == set(c['info']) else math.inf
        same_types = all(type(info[k]) is type(c['info'][k]) for k in c['info'] if k in info)
        dbg = (attribute_reward(p, c['goal'])[1], option_reward(list(c['options'].values()), goal_option_values(c['goal']))[1],
               list(title_nouns(c['goal']['name'])),
               list(title_nouns(p['name'])))
        want_dbg = tuple(c['debug'][k] for k in ('num_attr_matches', 'num_option_matches', 'goal_nouns', 'purchased_nouns'))
        if not (errs[-1] <= 1e-9 and info_err <= 1e-9 and list(info) == list(c['info']) and same_types and dbg == want_dbg):
            bad.append(c['case_id'])
    print(f"\nreward: {len(cases) - len(bad)}/{len(cases)} cases match | max reward error {max(errs):.3g}")
    assert len(cases) == 409 and not bad, bad[:5]

def test_reward_bad_input(shop):
    p = shop.catalog.products[0]
    with pytest.raises(KeyError, match="goal has no 'attributes'"): get_reward(p, {'asin': 'x'}, 1.0, {})

# ---------------------------------------------------------------- episodes
@needs_fixtures
def test_episodes(shop):
    envs = {m: WebShopEnv(m, shop=shop) for m in ('text', 'text_rich')}
    episodes = jsonl('episodes.jsonl')
    n_steps = n_obs = n_ok = 0; bad = []
    for e in episodes:
        env = envs[e['observation_mode']]
        obs, _ = env.reset(options={'goal': e['session']})
        assert env.goal['asin'] == e['goal']['asin'] and env.instruction_text == e['goal']['instruction_text']
        ok, info = True, {}
        for i, s in enumerate(e['steps']):
            if i: obs, reward, done, trunc, info = env.step(s['action'])
            same_obs = obs == s['observation']
            n_steps += 1; n_obs += same_obs
            if not (same_obs and env.get_available_actions() == s['available_actions']
                    and (i == 0 or (reward == s['reward'] and done == s['done'] and not trunc))):
                ok = False
        if e['verbose_info'] is not None and info.get('verbose_info') != e['verbose_info']: ok = False
        n_ok += ok
        if not ok: bad.append(e['episode_id'])
    print(f"\nepisodes: {n_ok}/{len(episodes)} exact | observations {n_obs}/{n_steps} (resets included)")
    assert len(episodes) == 60 and not bad, bad

# ---------------------------------------------------------------- env API and bad input
def test_env_api_and_snapshots(shop):
    env = WebShopEnv('text', shop=shop)
    obs, info = env.reset(options={'goal': 0})
    assert env.get_available_actions() == {'has_search_bar': True, 'clickables': ['search']}
    start = env.get_state()
    obs2, r, term, trunc, info = env.step('search[pillow]')
    assert info['executed'] and r == 0.0 and not term and env.state.page == 'results'
    mid = env.get_state()
    env.step(env.valid_actions()[-1])
    env.set_state(mid); assert env.observation == obs2
    env.set_state(start); assert env.observation == obs
    # no-ops: unparsable, refused, unknown, case-sensitive names
    for a in ['buy now', 'search[]', 'SEARCH[x]', 'click[search]', 'click[nothing here]', 'search[red [large] x]']:
        env.set_state(start)
        o, r, term, trunc, info = env.step(a)
        assert (o, r, term, info['executed'], env.get_state()) == (obs, 0.0, False, False, start), a

def test_env_determinism():
    a, b = WebShopEnv('text', seed=1234), WebShopEnv('text', seed=1234)
    for env in (a, b): env.reset(seed=5)
    assert a.get_state() == b.get_state() and a.catalog.prices == b.catalog.prices
    assert a.step('search[<r>]')[0] == b.step('search[<r>]')[0]

def test_env_bad_input(shop):
    env = WebShopEnv('text', shop=shop)
    with pytest.raises(ValueError, match='observation_mode'): WebShopEnv('html', shop=shop)
    with pytest.raises(IndexError, match='out of range'): env.reset(options={'goal': len(env.goals)})
    with pytest.raises(TypeError, match="must be an int"): env.reset(options={'goal': '3'})
    with pytest.raises(ValueError, match='unknown keys'): env.reset(options={'gaol': 3})
    with pytest.raises(TypeError, match='an action is a string'): env.step(3)
    with pytest.raises(TypeError, match='ShopState'): env.set_state({'page': 'search'})
    with pytest.raises(OriginalCrash, match='attributes'): env.step('search[<a> cotton]')
    with pytest.raises(OriginalCrash, match='TooManyClauses|at most 1024'):
        env.step('search[' + ' '.join(f'w{i}' for i in range(1100)) + ']')

def test_data_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match='WebShop data file missing'): load_products(tmp_path/'none.json')
    (tmp_path/'p.json').write_text('{"not": "a list"}')
    with pytest.raises(ValueError, match='expected a JSON list'): load_products(tmp_path/'p.json')
    (tmp_path/'q.json').write_text('[{"name": "x"}]')
    with pytest.raises(ValueError, match="no string 'asin'"): load_products(tmp_path/'q.json')
    assert parse_price('$3 - $4 - $5') == ([3.0, 4.0], '$3.0 to $4.0')
