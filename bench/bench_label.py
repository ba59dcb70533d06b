"""Step 1 throughput: LLM judging batched vs one prompt at a time, and the reward approximators' labeling rate.

Both LLM paths score the same prompts (the judge prompt on abstract states of the dataset) with the same model:
- one-at-a-time: each prompt alone (batch_size=1, no shared-prefix KV reuse), the naive baseline;
- batched: teduo's path (length-sorted batches, the shared prefix computed once, dedup) as the label stage runs it.
The approximators label every (state, goal) pair of the dataset (features + MLP) and are reported in pairs/s.
Run (after `dvc repro label`): `python bench/bench_label.py [--prompts 48]`.
"""
import argparse, time
import numpy as np
from teduo.core import read_jsonl, read_json
from teduo.collect import load_transitions
from teduo.abstract import canonical_selection, oracle_selection
from teduo.label import goal_view, describe, judge_chat, state_encoding, fit_reward_model, select_for_llm
from teduo.llm import LLM, LLMConfig

ap = argparse.ArgumentParser(); ap.add_argument('--prompts', type=int, default=48)
ap.add_argument('--model', default='outputs/models/smollm2-135m-instruct'); ap.add_argument('--dtype', default='bfloat16')
args = ap.parse_args()
data = load_transitions('outputs/babyai/transitions.parquet')
goals = [g['instruction'] for g in read_jsonl('outputs/babyai/goals/train.jsonl')][:4]
views = [goal_view(data, g, canonical_selection(oracle_selection(g)), 5) for g in goals]
chats = []
for v in views:
    ids = select_for_llm(v, args.prompts // len(views), 0)
    chats += [judge_chat(v.goal.goal, t) for t in describe(v, ids, 5)]

batched = LLM(LLMConfig(model=args.model, dtype=args.dtype, batch_size=16))
one = LLM(LLMConfig(model=args.model, dtype=args.dtype, batch_size=1))
one._backend = type(batched.backend)(one.cfg); one._backend._prefix_kv = lambda ids: (None, 0)  # naive: no prefix reuse
batched.score(chats[:2], ['Yes', 'No']); one.score(chats[:2], ['Yes', 'No'])  # warm-up (not timed, not cached below)
batched.cache = type(batched.cache)(None); one.cache = type(one.cache)(None)
t = time.perf_counter(); lp1 = one.score(chats, ['Yes', 'No']); t_one = time.perf_counter() - t
t = time.perf_counter(); lpb = batched.score(chats, ['Yes', 'No']); t_b = time.perf_counter() - t
ntok = one.stats['prompt_tokens']
print(f"LLM judge, {len(chats)} prompts ({ntok/len(chats):.0f} tokens each on average), {args.dtype}:")
print(f"  one at a time : {len(chats)/t_one:6.2f} prompts/s  ({ntok/t_one:6.0f} prompt tokens/s)   (baseline)")
print(f"  batched       : {len(chats)/t_b:6.2f} prompts/s  = {t_one/t_b:4.1f}x   (target >= 5x)")
print(f"  max |log-prob difference| between the two paths: {np.abs(lp1 - lpb).max():.2e}")

v = views[0]; X = state_encoding(v.states); y = (v.truth_frac >= .5).astype(float)
rm = fit_reward_model(X[:400], y[:400], seed=0)
pairs = sum(int(w.visits.sum()) for w in views)
t = time.perf_counter()
for w in views: rm.predict(state_encoding(w.states))
dt = time.perf_counter() - t
print(f"reward approximators: {pairs} (state, goal) pairs of the dataset labeled in {dt:.2f} s = {pairs/dt:,.0f} pairs/s (target >= 100k)")
