"""Throughput of the WebShop re-implementation: search queries/s and environment steps/s.

Same-run baselines, so the ratios mean something on any machine (wall times are printed, never asserted):
- search: `BM25Index.search` against a naive per-document, per-term Python BM25 over the same index statistics;
- env: `WebShopEnv.step` against a plain dict lookup of a precomputed (state, action) -> state table.
Run: `python bench/bench_webshop.py` from the repository root.
"""
import math, random, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np

from teduo.webshop.env import Shop, WebShopEnv
from teduo.webshop.search import analyze

def timed(f, n):
    t = time.perf_counter()
    for i in range(n): f(i)
    return (time.perf_counter() - t) / n

def naive_scores(index, query):
    "Un-vectorised BM25 (same statistics): loop over documents and query terms in Python."
    terms = {}
    for t in analyze(query): terms[t] = terms.get(t, 0) + 1
    cols = {t: index.postings[:, j].toarray().ravel() for t, j in ((t, index.vocab.get(t)) for t in terms) if j is not None}
    out = []
    for d in range(len(index.ids)):
        s = 0.0
        for t, boost in terms.items():
            tf = cols[t][d] if t in cols else 0.0
            if tf:
                w = boost * index.idf(int((cols[t] > 0).sum()))
                s += w - w / (1 + tf * index.inv_norm[d])
        out.append(s)
    return out

def main():
    t = time.perf_counter(); shop = Shop(seed=42); build = time.perf_counter() - t
    print(f"build (catalogue + index): {build:.2f} s, {len(shop.catalog.products)} products, {len(shop.index.vocab)} terms")
    queries = [g['instruction_text'] for g in shop.catalog.goals[:200]]
    fast = timed(lambda i: shop.index.search(queries[i % len(queries)]), 200)
    slow = timed(lambda i: naive_scores(shop.index, queries[i]), 5)
    print(f"search: {1 / fast:,.0f} queries/s vectorised | {1 / slow:,.1f} queries/s naive loop | ratio {slow / fast:,.0f}x")

    env = WebShopEnv('text', shop=shop); rng = random.Random(0)
    env.reset(options={'goal': 0})
    def step(i):
        acts = env.valid_actions()
        if env.state.page == 'done' or not acts or rng.random() < 0.1:
            env.step(f"search[{env.goals[rng.randrange(len(env.goals))]['instruction_text'][:40]}]")
        else:
            env.step(rng.choice([a for a in acts if a != 'click[buy now]'] or acts))
    step_s = timed(step, 3000)
    table = {(i, a): (i + 1) % 1000 for i in range(1000) for a in range(10)}
    state = [0]
    def lookup(i): state[0] = table[(state[0], i % 10)]
    dict_s = timed(lookup, 300000)
    print(f"env: {1 / step_s:,.0f} steps/s (random clicks, 10% searches) | {1 / dict_s:,.0f} dict-lookup steps/s | "
          f"ratio {step_s / dict_s:,.0f}x")
    snap = env.get_state()
    snap_s = timed(lambda i: env.set_state(snap), 100000)
    print(f"snapshot restore: {1 / snap_s:,.0f} /s")

if __name__ == '__main__': main()
