"""Step 2: vectorised Q-learning vs the per-transition reference loop on the same MDP, in the same run; and peak
memory (tracemalloc) of the offline_rl computation at two dataset sizes, extrapolated to the paper's scale.

Run (after `dvc repro label`): `python bench/bench_offline_rl.py [--sweeps 20]`.
"""
import argparse, resource, subprocess, sys, time, json
import numpy as np

ap = argparse.ArgumentParser(); ap.add_argument('--sweeps', type=int, default=20)
ap.add_argument('--child', nargs=2, type=int, default=None, help=argparse.SUPPRESS)
args = ap.parse_args()

if args.child:  # peak RSS of building + solving n_goals MDPs over n_transitions synthetic transitions
    n, g = args.child
    import tracemalloc
    from teduo.offline_rl import empirical_mdp, q_learning
    r = np.random.default_rng(0); S = max(n // 3, 10)
    data = [(r.integers(S, size=n), r.integers(7, size=n), r.integers(S, size=n), r.random(S) < 0.01) for _ in range(g)]
    tracemalloc.start()  # numpy and scipy buffers are traced: the peak of building + solving, imports and inputs excluded
    mdps = [empirical_mdp(s, a, s2, rew, S) for s, a, s2, rew in data]
    q_learning(mdps, tol=1e-6, max_sweeps=50)
    print(json.dumps({'peak_mb': tracemalloc.get_traced_memory()[1] / 2**20}))
    sys.exit()

from teduo.collect import load_transitions
from teduo.label import load_labels
from teduo.offline_rl import empirical_mdp, q_learning, q_learning_reference
data = load_transitions('outputs/babyai/transitions.parquet'); lg = load_labels('outputs/babyai/labels')[0]
N = 20_000  # the reference loop is slow: the first N transitions of one goal's MDP
s, a, s2, r = lg.s[:N], data.actions[:N], lg.s2[:N], lg.reward_oracle.astype(float)
mdp = empirical_mdp(s, a, s2, r, len(lg.states))
t = time.perf_counter(); q_learning_reference(s.tolist(), a.tolist(), s2.tolist(), r.tolist(), len(lg.states), tol=0, max_sweeps=args.sweeps); t_ref = time.perf_counter() - t
t = time.perf_counter(); q, info = q_learning(mdp, tol=0, max_sweeps=args.sweeps); t_vec = time.perf_counter() - t
print(f"Q-learning on one goal's MDP: {N} transitions, {len(mdp.sa_s)} (s,a) pairs, {args.sweeps} sweeps")
print(f"  reference loop : {N*args.sweeps/t_ref:12,.0f} transitions x sweeps / s   (baseline)")
print(f"  vectorised     : {N*args.sweeps/t_vec:12,.0f} transitions x sweeps / s  = {t_ref/t_vec:6.0f}x   (target >= 50x)")
lab = load_labels('outputs/babyai/labels')
t = time.perf_counter()
q_learning([empirical_mdp(l.s, data.actions, l.s2, l.reward.astype(float), len(l.states)) for l in lab], tol=1e-6)
print(f"  all {len(lab)} goals of the default run solved together to max|dQ| < 1e-6: {time.perf_counter() - t:.1f} s")

sizes = [(50_000, 4), (200_000, 4)]
peaks = [json.loads(subprocess.run([sys.executable, __file__, '--child', str(n), str(g)], capture_output=True, text=True, check=True).stdout)['peak_mb'] for n, g in sizes]
per = (peaks[1] - peaks[0]) / ((sizes[1][0] - sizes[0][0]) * sizes[0][1])  # MB per (transition x goal)
paper = peaks[0] + per * (800_000 * 500 - sizes[0][0] * sizes[0][1])
print(f"peak memory of building + solving (tracemalloc): {peaks[0]:.0f} MB at {sizes[0][0]:,} transitions x {sizes[0][1]} goals, {peaks[1]:.0f} MB at {sizes[1][0]:,} x {sizes[1][1]}")
print(f"  linear extrapolation to the paper's 800k transitions x 500 goals solved together: ~{paper/1024:.0f} GB "
      f"(solve in chunks of goals to stay within memory: {per*800_000:.0f} MB per goal)")
