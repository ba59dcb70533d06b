"""The BabyAI world: text rendering, the instruction parser, and `achieved` against minigrid's own reward."""
import numpy as np
import pytest
from minigrid.utils.baby_ai_bot import BabyAIBot

from teduo.babyai import (World, reset_layout, encode_state, restore_state, state_text, render_state, parse_instruction,
                          instruction_kind, achieved, achieved_batch, Goal, make_goal_lists, load_synonyms,
                          synthetic_instructions, layout_seeds, check_disjoint_layouts, goal_feasible)
from teduo.collect import start_episode

WORLD = World()

SEED0_TEXT = """Grid: 9x9 tiles, x grows east, y grows south; the border is wall.
Inner walls: (4,1) (4,2) (1,4) (2,4) (3,4) (4,4) (5,4) (7,4) (4,6) (4,7).
Objects:
1. purple ball at (5,1)
2. yellow ball at (2,2)
3. red ball at (3,2)
4. red ball at (2,3)
5. red door (locked) at (4,3)
6. red ball at (6,3)
7. red door (closed) at (6,4)
8. red box at (2,5)
9. green door (closed) at (4,5)
10. red key at (7,7)
Inventory: nothing.
Agent: at (3,7), facing east.
In front of the agent: wall at (4,7)."""


def test_text_rendering_fixed_seed():
    assert state_text(encode_state(reset_layout(WORLD.make_env(), 0))) == SEED0_TEXT


def test_text_rendering_inventory_and_open_door():
    env = reset_layout(WORLD.make_env(), 0)
    s = encode_state(env).copy()
    s[-3:] = (6, 2, 0)  # carrying a blue ball
    txt = state_text(s)
    assert 'Inventory: a blue ball.' in txt


def test_state_round_trip_and_image():
    env = reset_layout(WORLD.make_env(), 7)
    for a in [2, 2, 1, 2, 3, 0, 2, 5]: env.step(a)
    s = encode_state(env)
    other = restore_state(reset_layout(WORLD.make_env(), 7), s)
    assert (encode_state(other) == s).all()
    assert render_state(s, tile_size=8).shape == (72, 72, 3)


@pytest.mark.parametrize('text,kind', [
    ('go to the red ball', 'goto'), ('go to a door', 'goto'), ('go to the purple door', 'goto'),
    ('pick up a key', 'pickup'), ('pick up the grey box', 'pickup'), ('open the yellow door', 'open'),
    ('open a door', 'open'), ('put the red ball next to the blue key', 'putnext'),
    ('put a box next to the green door', 'putnext'), ('go to the tile (3,5)', 'tile'), ('Go to the tile ( 2 , 1 ).', 'tile'),
    ('go to an object', 'goto')])
def test_parser_each_kind(text, kind):
    assert instruction_kind(parse_instruction(text, WORLD)) == kind


def test_parser_on_every_synth_surface():
    env = WORLD.make_env()
    kinds = set()
    for ep in range(150):
        u = start_episode(env, ep % 30, 10_000 + ep)
        kinds.add(instruction_kind(parse_instruction(u.surface)))
    assert kinds == {'goto', 'pickup', 'open', 'putnext'}
    for k, instrs in synthetic_instructions(WORLD).items():
        for i in instrs: assert instruction_kind(parse_instruction(i, WORLD)) == k


@pytest.mark.parametrize('text,msg', [
    ('grab the red ball', "unknown action 'grab'"), ('pick up the crimson ball', "unknown colour 'crimson'"),
    ('go to the red sphere', "unknown object 'sphere'"), ('pick up the red door', 'impossible'),
    ('open the red ball', 'impossible'), ('put the red ball next to the red ball', 'impossible'),
    ('put the green door next to a ball', 'impossible'), ('go to the tile (4,4)', 'impossible'),
    ('go to the tile (0,3)', 'impossible'), ('go to the tile (12,3)', 'impossible'),
    ('put the red ball', "'put' needs 'next to'"), ('go to red ball', 'cannot parse'),
    ('go to the red ball then pick up a key', 'sequences'), ('pick up the ball on your left', 'location'),
    ('', 'empty')])
def test_parser_errors_name_the_goal(text, msg):
    with pytest.raises(ValueError) as e: parse_instruction(text, WORLD)
    assert msg in str(e.value) and repr(text) in str(e.value)


def test_goal_records():
    g = Goal.of({'goal': 'grab the azure crate', 'instruction': 'pick up the blue box'})
    assert (g.kind, g.category) == ('pickup', 'pick up')
    with pytest.raises(ValueError, match='needs keys'): Goal.of({'goal': 'x'})


def _bot_rollouts(n):
    env = WORLD.make_env()
    for ep in range(n):
        u = start_episode(env, ep % 60, 50_000 + ep)
        goal, bot, steps = u.surface, BabyAIBot(u), []
        for _ in range(300):
            a = bot.replan()
            _, reward, terminated, _, _ = u.step(a)
            steps.append((encode_state(u), a, terminated and reward > 0))
            if terminated: break
        yield goal, steps


def test_achieved_agrees_with_env_reward_on_bot_rollouts():
    """`achieved(state, goal, last_action)` equals minigrid's success signal at every step of 300 bot rollouts;
    the state-only form agrees everywhere except the documented put-next case, which must stay rare."""
    n_ep = n_steps = state_only_diffs = successes = 0
    kinds = set()
    for goal, steps in _bot_rollouts(300):
        n_ep += 1; kinds.add(Goal.of(goal).kind)
        S = np.stack([s for s, _, _ in steps]); A = np.array([a for _, a, _ in steps]); ok = np.array([o for _, _, o in steps])
        assert (achieved_batch(S, goal, A) == ok).all(), goal
        for s, a, o in steps: assert achieved(s, goal, a) == o
        state_only = achieved_batch(S, goal)
        assert state_only[ok].all()  # every rewarded state is achieved by the state-only check
        diffs = state_only != ok
        if diffs.any(): assert Goal.of(goal).kind == 'putnext', goal
        state_only_diffs += int(diffs.sum()); n_steps += len(steps); successes += int(ok.sum())
    assert n_ep == 300 and successes >= 290 and kinds == {'goto', 'pickup', 'open', 'putnext'}
    assert state_only_diffs <= 0.01 * n_steps


def test_achieved_does_not_touch_the_env():
    env = reset_layout(WORLD.make_env(), 3)
    before = encode_state(env).copy()
    achieved(before, 'go to the red ball'); achieved_batch(np.stack([before] * 3), 'open a door')
    assert (encode_state(env) == before).all()


def test_goal_lists_deterministic_and_disjoint(root):
    syn = load_synonyms(root/'data/babyai/synonyms.json')
    kinds = {'goto': 0.4, 'pickup': 0.25, 'open': 0.1, 'putnext': 0.15, 'tile': 0.1}
    a = make_goal_lists(WORLD, 30, 15, kinds, syn, seed=3)
    assert a == make_goal_lists(WORLD, 30, 15, kinds, syn, seed=3)
    train, test = a
    assert not {g['instruction'] for g in train} & {g['instruction'] for g in test}
    assert all(t['goal'] != t['instruction'] for t in test)
    with pytest.raises(ValueError, match='unknown kinds'): make_goal_lists(WORLD, 3, 1, {'fly': 1.0}, syn, 0)


def test_goal_lists_have_the_same_category_mix(root):
    from collections import Counter
    from teduo.babyai import apportion
    syn = load_synonyms(root/'data/babyai/synonyms.json')
    kinds = {'goto': 0.4, 'pickup': 0.2, 'open': 0.1, 'putnext': 0.2, 'tile': 0.1}
    for seed in range(3):
        train, test = make_goal_lists(WORLD, 20, 10, kinds, syn, seed=seed)
        ctr, cte = Counter(g['kind'] for g in train), Counter(g['kind'] for g in test)
        assert ctr == {'goto': 8, 'pickup': 4, 'open': 2, 'putnext': 4, 'tile': 2}
        assert {k: 2 * v for k, v in cte.items()} == ctr  # the same shares, exactly
    # sizes that do not divide: each kind's share differs from its weight by less than one goal, in either list
    for n in (7, 13):
        q = apportion(n, {'goto': 0.4, 'pickup': 0.25, 'open': 0.1, 'putnext': 0.15, 'tile': 0.1})
        assert sum(q.values()) == n and all(abs(q[k] - w * n) < 1 for k, w in
                                            {'goto': 0.4, 'pickup': 0.25, 'open': 0.1, 'putnext': 0.15, 'tile': 0.1}.items())
    assert apportion(3, {'a': 1, 'b': 1}) == {'a': 2, 'b': 1}  # ties go to the first kind by name


def test_a_tile_goal_is_feasible_only_on_empty_floor():
    from teduo.babyai import goal_feasible, EMPTY, WALL, DOOR, StateView
    s = encode_state(reset_layout(WORLD.make_env(), 0)); g = StateView.of(s).grid
    occupied = [(x, y) for x in range(1, g.shape[0] - 1) for y in range(1, g.shape[1] - 1) if int(g[x, y, 0]) not in (EMPTY, WALL, DOOR)]
    free = [(x, y) for x in range(1, g.shape[0] - 1) for y in range(1, g.shape[1] - 1) if int(g[x, y, 0]) == EMPTY]
    assert occupied and free
    assert goal_feasible(s, f"go to the tile ({free[0][0]},{free[0][1]})")
    assert not goal_feasible(s, f"go to the tile ({occupied[0][0]},{occupied[0][1]})")  # a ball, box or key lies there


def test_goal_file_not_utf8_names_the_file(tmp_path):
    from teduo.core import read_json, read_jsonl, write_jsonl
    f = tmp_path/'train.jsonl'
    write_jsonl([{'goal': 'go to the red ball', 'instruction': 'go to the red ball'}], f)
    assert read_jsonl(f)[0]['goal'] == 'go to the red ball'
    f.write_bytes('{"goal": "aller à la balle"}\n'.encode('latin-1'))  # saved by an editor in Latin-1
    with pytest.raises(ValueError, match=r'train\.jsonl: not UTF-8 text.*byte 0xe0'): read_jsonl(f)
    (tmp_path/'g.json').write_bytes(b'\xff\xfe{}')
    with pytest.raises(ValueError, match=r'g\.json: not UTF-8 text'): read_json(tmp_path/'g.json')


def test_layout_seeds():
    assert layout_seeds({'start': 5, 'count': 3}) == [5, 6, 7]
    with pytest.raises(ValueError, match='share seeds'): check_disjoint_layouts([1, 2], [2, 3])
    with pytest.raises(ValueError, match='unknown keys'): layout_seeds({'start': 1, 'cnt': 2})
    for empty in ({'start': 7, 'count': 0}, []):
        with pytest.raises(ValueError, match=r'params.yaml:babyai.train_layouts: no layouts'):
            layout_seeds(empty, 'params.yaml:babyai.train_layouts')


def test_goal_feasible():
    s = encode_state(reset_layout(WORLD.make_env(), 0))
    assert goal_feasible(s, 'pick up the red key') and not goal_feasible(s, 'pick up the blue key')
    assert goal_feasible(s, 'put a ball next to the red key') and not goal_feasible(s, 'go to the tile (4,1)')
