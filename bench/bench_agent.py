"""Acting throughput of the LLM agent: 32 episodes stepped together (one batched LLM call per step) vs the same 32
episodes one at a time, in the same run, same model, greedy, closed-loop (a query per step), no cache reuse.

Both prompts the evaluation uses are measured: `teduo` (the fine-tuned agent's prompt, with its adapter when
`outputs/babyai/adapter` exists; the zero-shot baseline uses the same prompt) and `in_context` (worked examples,
a long shared prefix). `max_new_tokens` (`auto`: sized from sft_data.max_plan_len) and the model come from params.yaml
(evaluate, base.llm.policy) unless given.
Run: `python bench/bench_agent.py [--episodes 32 --steps 3] [--prompts teduo in_context] [--adapter PATH|none]`.
"""
import argparse, time
from pathlib import Path
import yaml
from teduo.babyai import World, Goal
from teduo.evaluate import make_episodes, run_episodes, answer_budget
from teduo.agent import LLMAgent
from teduo.llm import LLM, LLMConfig, LLMCache

P = yaml.safe_load(open('params.yaml'))
ap = argparse.ArgumentParser(); ap.add_argument('--episodes', type=int, default=32); ap.add_argument('--steps', type=int, default=3)
ap.add_argument('--prompts', nargs='+', default=['teduo', 'in_context'])
ap.add_argument('--model', default=P['base']['llm']['policy']['model']); ap.add_argument('--dtype', default=P['base']['llm']['policy']['dtype'])
ap.add_argument('--adapter', default=P['evaluate']['inputs']['adapter'], help="LoRA adapter of the teduo prompt ('none': the untuned model)")
ap.add_argument('--max-new-tokens', type=int, default=answer_budget(P['evaluate']['max_new_tokens'], P['sft_data']['max_plan_len']))
args = ap.parse_args()
world = World()
goals = ['go to the red ball', 'pick up a key', 'open a door', 'go to the tile (2,2)']
specs, _ = make_episodes(world, 'bench', goals, list(range(1_000_000, 1_000_040)), args.episodes // len(goals), seed=0)

def run(llm, prompt, batched):
    "actions/s and LLM queries of the episodes, batched or one episode at a time (nothing cached between runs)."
    llm.cache = LLMCache(None)
    agent = LLMAgent(llm, {}, world.room_size, prompt=prompt, replan_every=1, max_new_tokens=args.max_new_tokens)
    t = time.perf_counter()
    if batched: logs = [run_episodes(agent, specs, world, args.steps, progress=False)[0]]; queries = agent.queries
    else:
        logs, queries = [], 0
        for s in specs: logs.append(run_episodes(agent, [s], world, args.steps, progress=False)[0]); queries += agent.queries
    dt = time.perf_counter() - t
    return sum(int(l.steps.sum()) for l in logs) / dt, queries

for prompt in args.prompts:
    adapter = args.adapter if prompt == 'teduo' and args.adapter != 'none' and Path(args.adapter).exists() else None
    llm = LLM(LLMConfig(model=args.model, adapter=adapter, dtype=args.dtype, batch_size=args.episodes), LLMCache(None))
    llm.generate([[{'role': 'user', 'content': 'warm up'}]], max_new_tokens=2)
    one, q1 = run(llm, prompt, False)
    bat, qb = run(llm, prompt, True)
    print(f"LLM agent, prompt {prompt}{' + adapter ' + adapter if adapter else ' (untuned)'}, {len(specs)} episodes x "
          f"{args.steps} closed-loop steps, <= {args.max_new_tokens} new tokens, {args.dtype}:")
    print(f"  one episode at a time : {one:6.2f} actions/s  ({q1} queries)   (baseline)")
    print(f"  {len(specs)} episodes batched   : {bat:6.2f} actions/s  ({qb} queries) = {bat/one:4.1f}x   (target >= 4x)", flush=True)
