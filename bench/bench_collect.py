"""Collection throughput vs the raw minigrid step rate, measured in the same run.

Baseline: uniformly random actions through `env.unwrapped.step` (one core), which is what minigrid itself costs.
Measured: teduo's collection (state recording included) with the random policy on one worker (the >= 70% target),
the default behaviour mixture on one worker, and the mixture on all workers.
Run: `python bench/bench_collect.py [--steps 20000]`.
"""
import argparse, os, time
import numpy as np
from teduo.babyai import World, reset_layout
from teduo.collect import plan_episodes, collect_episodes

ap = argparse.ArgumentParser(); ap.add_argument('--steps', type=int, default=20_000)
ap.add_argument('--workers', type=int, default=os.cpu_count())
args = ap.parse_args()
world = World()

def raw_rate(n):
    env = reset_layout(world.make_env(), 0); env.max_steps = 10**9
    r = np.random.default_rng(0); acts = r.integers(7, size=n)
    t = time.perf_counter()
    for i, a in enumerate(acts):
        env.step(int(a))
        if i % 48 == 47: reset_layout(env, i)
    return n / (time.perf_counter() - t)

def collect_rate(policies, n_workers, step_cap=48, n_steps=args.steps):
    n_ep = max(1, n_steps // (step_cap if 'random' in policies and len(policies) == 1 else 20))
    specs = plan_episodes(n_ep, list(range(50)), policies, seed=0)
    t = time.perf_counter()
    eps = collect_episodes(world, specs, step_cap, 0.25, n_workers=n_workers, progress=False)
    dt = time.perf_counter() - t
    return sum(len(e['actions']) for e in eps) / dt

raw = raw_rate(args.steps)
rand1 = collect_rate({'random': 1.0}, 1)
mix1 = collect_rate({'bot': 0.5, 'noisy_bot': 0.3, 'random': 0.2}, 1)
mixn = collect_rate({'bot': 0.5, 'noisy_bot': 0.3, 'random': 0.2}, args.workers)
print(f"raw minigrid random steps (1 core)      : {raw:8.0f} steps/s   (baseline)")
print(f"collect, random policy (1 worker)       : {rand1:8.0f} transitions/s  = {rand1/raw:5.2f}x raw  (target >= 0.70x)")
print(f"collect, default mixture (1 worker)     : {mix1:8.0f} transitions/s  = {mix1/raw:5.2f}x raw")
print(f"collect, default mixture ({args.workers} workers)    : {mixn:8.0f} transitions/s  = {mixn/raw:5.2f}x raw, {mixn/mix1:4.2f}x one worker")
