"""Step 1 throughput: LLM judging batched vs one prompt at a time, and the reward approximators' labeling rate.

The three LLM paths score the same prompts (the label stage's judge prompt on abstract states of the dataset, picked
as the stage picks them) with the same model and dtype (params.yaml base.llm.labeling):
- one at a time: each prompt alone (batch 1, no shared-prefix KV reuse), the naive baseline;
- batching alone: length-sorted batches, no prefix reuse (what batching buys on this CPU: the machine is
  prefill-bound, see ../shared/LLM.md);
- teduo's path: batches plus the shared prompt prefix computed once (the label stage's path).
Each row prints prompts/s, computed prompt tokens/s and "effective" tokens/s (every prompt's full length / time).
The approximators label every (state, goal) pair of the dataset (features + MLP) and are reported in pairs/s.
Run (after `dvc repro label`): `python bench/bench_label.py [--goals 4 --per-goal 12]`.
"""
import argparse, time
import numpy as np, yaml
from teduo.core import read_jsonl, read_json
from teduo.collect import load_transitions
from teduo.label import goal_view, describe, judge_chat, state_encoding, fit_reward_model, select_for_llm
from teduo.llm import LLM, LLMConfig, LLMCache

P = yaml.safe_load(open('params.yaml')); L = P['base']['llm']['labeling']
ap = argparse.ArgumentParser(); ap.add_argument('--goals', type=int, default=4); ap.add_argument('--per-goal', type=int, default=12)
ap.add_argument('--model', default=L['model']); ap.add_argument('--dtype', default=L['dtype'])
ap.add_argument('--batch-size', type=int, default=L['batch_size'])
args = ap.parse_args()
room = P['babyai']['room_size']
data = load_transitions(P['collect']['out'])
goals = read_jsonl(f"{P['goals']['out_dir']}/train.jsonl")[:args.goals]
sel = {a['instruction']: a['selection'] for a in read_json(P['abstract']['out'])['abstractions']}
views = [goal_view(data, g, sel[g['instruction']], room) for g in goals]
chats = [judge_chat(v.goal.goal, t) for v in views for t in describe(v, select_for_llm(v, args.per_goal, P['base']['seed']), room)]

def path(batch_size, reuse_prefix):
    llm = LLM(LLMConfig(model=args.model, dtype=args.dtype, batch_size=batch_size), LLMCache(None))
    if not reuse_prefix: llm.backend._prefix_kv = lambda ids: (None, 0)
    llm.score(chats[:2], ['Yes', 'No'])  # warm-up
    return llm

paths = {'one at a time': path(1, False), 'batching alone': path(args.batch_size, False), "teduo's path": path(args.batch_size, True)}
ntok = np.array(paths['one at a time'].backend.encode_chats(chats), dtype=object)
full = sum(map(len, ntok)); shared = paths["teduo's path"].backend._prefix(list(ntok))
res = {}
for name, llm in paths.items():
    llm.cache = LLMCache(None)  # nothing reused between paths
    t = time.perf_counter(); res[name] = (llm.score(chats, ['Yes', 'No']), time.perf_counter() - t)
print(f"LLM judge: {len(chats)} prompts of {full/len(chats):.0f} tokens on average ({shared} shared by all), {args.dtype}, "
      f"batch {args.batch_size}:")
base = res['one at a time'][1]
for name, (_, dt) in res.items():
    computed = full - (len(chats) - 1) * shared if name == "teduo's path" else full
    print(f"  {name:15s}: {len(chats)/dt:6.2f} prompts/s = {base/dt:4.1f}x   computed {computed/dt:5.0f} tokens/s, "
          f"effective {full/dt:5.0f} tokens/s" + ('   (baseline)' if name == 'one at a time' else '   (target >= 5x)' if name == "teduo's path" else ''))
a, b = res['one at a time'][0], res["teduo's path"][0]
print(f"  same Yes/No ranking decisions: {np.mean((a[:, 0] > a[:, 1]) == (b[:, 0] > b[:, 1])):.0%}; max |log-prob difference| "
      f"{np.abs(a - b).max():.2e} ({args.dtype} rounding: batch shapes change the summation order; float32 paths agree to "
      f"1e-4, tests/test_llm.py)")

v = views[0]; X = state_encoding(v.states); y = (v.truth_frac >= .5).astype(float)
rm = fit_reward_model(X[:400], y[:400], seed=0)
allv = [goal_view(data, g, sel[g['instruction']], room) for g in read_jsonl(f"{P['goals']['out_dir']}/train.jsonl")]
pairs = 2 * len(data) * len(allv)  # both ends of every transition, for every goal
t = time.perf_counter()
for w in allv:
    r = rm.predict(state_encoding(w.states)); r[w.s]; r[w.s2]  # distinct abstract states, then every transition's ends
dt = time.perf_counter() - t
t = time.perf_counter()
for w in allv[:2]: rm.predict(state_encoding(np.concatenate([w.states[w.s], w.states[w.s2]])))
dt_all = (time.perf_counter() - t) * len(allv) / 2
print(f"reward approximators: {len(allv)} training goals x {len(data):,} transitions x 2 ends = {pairs:,} (state, goal) pairs")
print(f"  per distinct abstract state ({sum(len(w.states) for w in allv):,} of them), then a lookup: {dt:.2f} s = "
      f"{pairs/dt:,.0f} pairs/s (target >= 100k)")
print(f"  every pair through the network (no dedup), estimated from 2 goals: {dt_all:.1f} s = {pairs/dt_all:,.0f} pairs/s")
