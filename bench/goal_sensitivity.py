"""How the default world and step limit were chosen (params babyai.*, evaluate.max_steps): on the TRAINING goals x
TRAINING layouts only, for candidate worlds, how often goal-blind behaviour succeeds against BabyAI's bot.

For each world: the goal lists `make_goal_lists` draws for it (params goals.*), 10 starts per training goal on the
training layouts (evaluate's rule: starts the bot solves in fewer than `--min-bot-steps` actions are redrawn), then
- bot: success within T actions (its path length from each start);
- random: the uniform-random agent;
- shuffled bot: BabyAI's bot pursuing ANOTHER training goal (a fixed derangement), scored on the true goal. It is the
  strongest goal-blind walker we know (it crosses rooms, opens doors, picks things up as the data's bot does), a cheap
  stand-in for the goal-shuffled learned controls, which need the whole pipeline rerun per world.
Never run it on test goals or test layouts: that would tune the instrument on what it measures.

Run: `python bench/goal_sensitivity.py [--worlds 5,2,2,6 6,2,2,8] [--limits 64 80 96] [--min-bot-steps 12]`
(a world is room_size,num_rows,num_cols,num_dists). ~30 s per world on the 2-core CPU.
Measured (AMD EPYC, seed 0): 5,2,2,6: bot 98.5/99.0/99.5 %, random 2.0/3.0/3.0 %, shuffled bot 11.5 % at T 64/80/96;
6,2,2,8: bot 96.5/99-100/100 %, random 0.0/1.5-2.5/1.5 %, shuffled bot 4.5-5.5 %.
"""
import argparse, sys, time
from pathlib import Path
import numpy as np
import yaml
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's teduo, not another one installed
from teduo.babyai import (World, Goal, make_goal_lists, load_synonyms, layout_seeds, parse_instruction, quiet, encode_state,
                          achieved, ACTIONS)
from teduo.collect import start_episode
from teduo.evaluate import make_episodes, run_episodes
from teduo.agent import RandomAgent, _Bot

P = yaml.safe_load(open('params.yaml'))
ap = argparse.ArgumentParser()
ap.add_argument('--worlds', nargs='+', default=['5,2,2,6', '6,2,2,8'])
ap.add_argument('--limits', nargs='+', type=int, default=[64, 80, 96])
ap.add_argument('--min-bot-steps', type=int, default=P['evaluate']['min_bot_steps'])
ap.add_argument('--per-goal', type=int, default=10)
args = ap.parse_args()
T_MAX, seed, G = max(args.limits), P['base']['seed'], P['goals']

def shuffled_bot_steps(world, specs, other:dict)->np.ndarray:
    "Actions until the TRUE goal is achieved while the bot pursues `other[goal]` (random once it gives up); 10**6: never."
    r, out = np.random.default_rng(seed), []
    for sp in specs:
        env = start_episode(world.make_env(), sp.layout_seed, sp.episode_seed)
        try:
            with quiet(): bot = _Bot(env, parse_instruction(other[sp.goal.goal].instruction, world))
        except Exception: bot = None  # the other goal is impossible in this layout
        last, res = None, 10**6
        for t in range(T_MAX):
            a = None
            if bot is not None:
                try: a = bot.act(last)
                except Exception: bot = None
            if a is None: a = int(r.integers(len(ACTIONS)))
            env.step(a); last = a
            if achieved(encode_state(env), sp.goal, a): res = t + 1; break
        out.append(res)
    return np.array(out)

for w in args.worlds:
    rs, nr, nc, nd = map(int, w.split(','))
    world = World(room_size=rs, num_rows=nr, num_cols=nc, num_dists=nd, max_steps=T_MAX, locked_room_prob=P['babyai']['locked_room_prob'])
    train, _ = make_goal_lists(world, G['n_train'], G['n_test'], G['kinds'], load_synonyms(G['synonyms']), seed)
    train = [Goal.of(g) for g in train]
    t0 = time.perf_counter()
    specs, skipped = make_episodes(world, 'train/train', train, layout_seeds(P['babyai']['train_layouts']), args.per_goal, seed,
                                   min_bot_steps=args.min_bot_steps, bot_cap=4*T_MAX)
    bot = np.array([s.bot_steps if s.bot_steps is not None else 10**6 for s in specs])
    log, _ = run_episodes(RandomAgent(seed), specs, world, T_MAX, progress=False)
    order = sorted({g.goal: g for g in train}.values(), key=lambda g: g.goal)
    sb = shuffled_bot_steps(world, specs, {g.goal: order[(i + 1) % len(order)] for i, g in enumerate(order)})
    print(f"world {w} (rooms {nr}x{nc} of {rs}, {nd} distractors): {len(specs)} pairs, {len(skipped)} goals skipped, "
          f"bot path p50/p90/p95/p99 {np.percentile(bot, [50, 90, 95, 99]).round(1).tolist()} ({time.perf_counter() - t0:.0f} s)")
    for T in args.limits:
        print(f"  T={T:4d}: bot {np.mean(bot <= T):.3f}  random {np.mean(log.success & (log.steps <= T)):.3f}  "
              f"shuffled bot {np.mean(sb <= T):.3f}")
