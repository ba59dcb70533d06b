"""Decoding cost of the LLM agent's answers with and without the `action_list` stop rule (an answer ends once its
list is closed or can never parse, and ended rows leave the batch), in the same run, same model, same episodes,
greedy, open-loop, nothing cached between the two. The episodes' actions must be identical: the rule saves tokens,
never changes a plan.
Run: `python bench/bench_stop.py [--episodes 32 --steps 8] [--prompts teduo in_context] [--state raw|abstract] [--adapter PATH|none]`.
"""
import argparse, sys, time
from pathlib import Path
import yaml
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's teduo, not another one installed
from teduo.babyai import World
from teduo.evaluate import make_episodes, run_episodes, answer_budget
from teduo.agent import LLMAgent, raw_in_context_examples
from teduo.llm import LLM, LLMConfig, LLMCache

P = yaml.safe_load(open('params.yaml'))
ap = argparse.ArgumentParser(); ap.add_argument('--episodes', type=int, default=32); ap.add_argument('--steps', type=int, default=8)
ap.add_argument('--prompts', nargs='+', default=['teduo', 'in_context']); ap.add_argument('--state', default='raw')
ap.add_argument('--adapter', default='none', help="LoRA adapter for the teduo prompt ('none': the untuned model)")
args = ap.parse_args()
world = World()
goals = ['go to the red ball', 'pick up a key', 'open a door', 'go to the tile (2,2)']
specs, _ = make_episodes(world, 'bench', goals, list(range(1_000_000, 1_000_040)), args.episodes // len(goals), seed=0)
budget = answer_budget(P['evaluate']['max_new_tokens'], P['sft_data']['max_plan_len'])

class NoStop(LLM):
    "The same LLM, the stop rule ignored: the baseline."
    def generate(self, chats, *a, stop=None, **kw): return super().generate(chats, *a, **kw)

for prompt in args.prompts:
    row = {}
    for name, cls in (('no stop', NoStop), ('stop', LLM)):
        cfg = dict(P['base']['llm']['policy'])
        if prompt == 'teduo' and args.adapter != 'none': cfg['adapter'] = args.adapter
        llm = cls(LLMConfig.from_params(cfg, 'params.yaml:base.llm.policy'), LLMCache(None))
        ex = raw_in_context_examples(world) if prompt == 'in_context' and args.state == 'raw' else None
        agent = LLMAgent(llm, {}, world.room_size, prompt=prompt, state=args.state, examples=ex, replan_every=None,
                         max_new_tokens=budget, retries=P['evaluate']['retries'], retry_temperature=P['evaluate']['retry_temperature'])
        t = time.perf_counter(); log = run_episodes(agent, specs, world, args.steps, progress=False)[0]; dt = time.perf_counter() - t
        row[name] = (dt, llm.stats['completion_tokens'], log.drop(columns=[]).to_dict('records'))
    (t0, k0, l0), (t1, k1, l1) = row['no stop'], row['stop']
    print(f"{prompt} ({args.state} state, {len(specs)} episodes x {args.steps} steps): decoded tokens {k0} -> {k1}, "
          f"wall {t0:.1f} s -> {t1:.1f} s: {t0 / t1:.2f}x faster; same episodes: {l0 == l1}")
