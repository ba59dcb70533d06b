"""Acting throughput of the LLM agent: 32 episodes stepped together (one batched LLM call per step) vs the same 32
episodes one at a time, in the same run, same model, greedy, closed-loop (a query per step), no cache reuse.

Run: `python bench/bench_agent.py [--episodes 32 --steps 3] [--adapter outputs/babyai/adapter]`.
"""
import argparse, time
import numpy as np
from teduo.babyai import World, Goal
from teduo.evaluate import make_episodes, run_episodes
from teduo.agent import LLMAgent
from teduo.llm import LLM, LLMConfig, LLMCache

ap = argparse.ArgumentParser(); ap.add_argument('--episodes', type=int, default=32); ap.add_argument('--steps', type=int, default=3)
ap.add_argument('--model', default='outputs/models/smollm2-135m-instruct'); ap.add_argument('--adapter', default=None)
ap.add_argument('--dtype', default='bfloat16')
args = ap.parse_args()
world = World()
goals = ['go to the red ball', 'pick up a key', 'open a door', 'go to the tile (2,2)']
specs, _ = make_episodes(world, 'bench', goals, list(range(1_000_000, 1_000_040)), args.episodes // len(goals), seed=0)
cfg = LLMConfig(model=args.model, adapter=args.adapter, dtype=args.dtype, batch_size=args.episodes)
llm = LLM(cfg, LLMCache(None)); llm.generate([[{'role': 'user', 'content': 'warm up'}]], max_new_tokens=2)

def run(batched):
    llm.cache = LLMCache(None)  # nothing reused between the two runs
    agent = LLMAgent(llm, {}, world.room_size, replan_every=1, max_new_tokens=16)
    t = time.perf_counter()
    if batched: log, _ = run_episodes(agent, specs, world, args.steps, progress=False)
    else: log = [run_episodes(agent, [s], world, args.steps, progress=False)[0] for s in specs]
    dt = time.perf_counter() - t
    steps = int(log.steps.sum()) if batched else sum(int(l.steps.sum()) for l in log)
    return steps / dt, agent.queries

one, q1 = run(False)
bat, qb = run(True)
print(f"LLM agent, {len(specs)} episodes x {args.steps} closed-loop steps ({args.dtype}{', adapter' if args.adapter else ''}):")
print(f"  one episode at a time : {one:6.2f} actions/s  ({q1} queries)   (baseline)")
print(f"  {len(specs)} episodes batched   : {bat:6.2f} actions/s  = {bat/one:4.1f}x   (target >= 4x)")
