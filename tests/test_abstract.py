"""Step 1a, the goal-specific state abstraction: its rules on hand-built states, its text, the selection schema, the
oracle and grammar-constrained selections, and that model output is only ever parsed, never executed."""
import json

import numpy as np
import pytest

from teduo.babyai import World, reset_layout, encode_state, state_len, COLORS, OBJECT_TYPES, synthetic_instructions
from teduo.abstract import (SELECTION_SCHEMA, HIDDEN, FLOOR, WALLC, OBSTACLE, DOORC, GOAL_OBJECT, GOAL_LOCATION,
                            oracle_selection, canonical_selection, abstract_states, abstract_text, abstract_len,
                            constrained_selections, llm_selections, make_abstractions, abstraction_report, unique_rows)
from teduo.llm import LLM, LLMConfig, ParseError, parse_json_answer
from fakes import ScriptedBackend

W = H = 9  # World(): 2x2 rooms of 5 tiles, walls on x, y in {0, 4, 8}
RS = 5
T = {'empty': 1, 'wall': 2, 'door': 4, 'key': 5, 'ball': 6, 'box': 7}
C = {c: i for i, c in enumerate(COLORS)}
OPEN, CLOSED, LOCKED = 0, 1, 2
DOORS = {(4, 2): ('red', CLOSED), (6, 4): ('green', OPEN), (4, 6): ('blue', LOCKED), (2, 4): ('yellow', CLOSED)}


def make_state(objects=None, agent=(1, 1, 0), carried=None, doors=None):
    """A 9x9 four-room state by hand: {(x, y): (type, colour)} objects, {(x, y): (colour, state)} doors, the agent
    (x, y, dir) and a carried (type, colour)."""
    g = np.zeros((W, H, 3), np.uint8); g[..., 0] = T['empty']
    for i in range(W):
        for j in range(H):
            if i in (0, 4, 8) or j in (0, 4, 8): g[i, j] = (T['wall'], 5, 0)
    for (x, y), (col, st) in (DOORS if doors is None else doors).items(): g[x, y] = (T['door'], C[col], st)
    for (x, y), (typ, col) in (objects or {}).items(): g[x, y] = (T[typ], C[col], 0)
    car = (T['empty'], 0, 0) if carried is None else (T[carried[0]], C[carried[1]], 0)
    s = np.concatenate([[W, H], g.reshape(-1), [*agent, *car]]).astype(np.uint8)
    assert len(s) == state_len(W, H)
    return s


def grid_of(a):
    "(W, H) category and (W, H) door state of one abstract state."
    code = a[2:-4].reshape(W, H)
    return code // 3, code % 3


OBJS = {(2, 2): ('ball', 'red'), (3, 1): ('key', 'blue'), (6, 6): ('ball', 'red'), (6, 2): ('box', 'green')}


def test_identity_when_selection_is_none():
    s = np.stack([make_state(OBJS), make_state(OBJS, agent=(6, 6, 2))])
    out = abstract_states(s, None, RS)
    assert out is s or np.array_equal(out, s)
    assert out.shape == (2, state_len(W, H))


def test_categories_of_goal_object_location_and_obstacles():
    sel = {'goal_objects': [{'color': 'red', 'type': 'ball'}], 'goal_locations': [{'color': 'blue', 'type': 'key'}]}
    a = abstract_states(make_state(OBJS, agent=(4, 2, 0))[None], sel, RS)[0]  # agent in a doorway: the whole grid shows
    assert a.shape == (abstract_len(W, H),) and tuple(a[:2]) == (W, H)
    cat, st = grid_of(a)
    assert cat[2, 2] == cat[6, 6] == GOAL_OBJECT      # every red ball
    assert cat[3, 1] == GOAL_LOCATION                 # the blue key
    assert cat[6, 2] == OBSTACLE                      # a distractor: type and colour dropped
    assert cat[0, 0] == cat[4, 1] == WALLC and cat[1, 1] == FLOOR and (cat != HIDDEN).all()
    assert tuple(a[-4:]) == (4, 2, 0, 0)              # agent x, y, dir and 'carrying nothing'


def test_unmentioned_doors_lose_colour_but_keep_state():
    sel = oracle_selection('go to the red ball')
    base = make_state(OBJS)
    recoloured = make_state(OBJS, doors={(4, 2): ('purple', CLOSED), (6, 4): ('grey', OPEN), (4, 6): ('red', LOCKED),
                                         (2, 4): ('green', CLOSED)})
    opened = make_state(OBJS, doors={**DOORS, (4, 2): ('red', OPEN)})
    a, b, c = abstract_states(np.stack([base, recoloured, opened]), sel, RS)
    assert np.array_equal(a, b), 'door colours must not reach the abstract state'
    assert not np.array_equal(a, c), 'door states must'
    cat, st = grid_of(a)
    for (x, y), (_, s) in DOORS.items(): assert cat[x, y] == DOORC and st[x, y] == s
    # a goal door keeps its state too, in the goal-object category
    cat, st = grid_of(abstract_states(base[None], oracle_selection('open the blue door'), RS)[0])
    assert cat[4, 6] == GOAL_OBJECT and st[4, 6] == LOCKED and cat[4, 2] == DOORC


def test_distractor_colours_and_types_do_not_matter():
    sel = oracle_selection('pick up the red ball')
    a = make_state(OBJS); b = make_state({**OBJS, (6, 2): ('key', 'purple')})
    c = make_state({**OBJS, (6, 2): ('ball', 'green')})  # a ball, but not a red one
    out = abstract_states(np.stack([a, b, c]), sel, RS)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


def test_crop_to_agent_room_only_when_all_relevant_tiles_are_inside():
    objs = {(2, 2): ('ball', 'red'), (6, 6): ('key', 'blue'), (6, 2): ('box', 'green')}
    sel = oracle_selection('go to the red ball')   # its only red ball is in the agent's room (0..4, 0..4)
    a = abstract_states(make_state(objs, agent=(1, 3, 1))[None], sel, RS)[0]
    cat, _ = grid_of(a)
    inside = np.zeros((W, H), bool); inside[:5, :5] = True
    assert (cat[~inside] == HIDDEN).all() and (cat[inside] != HIDDEN).all()
    assert cat[2, 2] == GOAL_OBJECT and cat[4, 2] == DOORC  # the room's own walls and doors stay visible
    # the same state, a goal object outside the room: no crop
    cat, _ = grid_of(abstract_states(make_state(objs, agent=(1, 3, 1))[None], oracle_selection('go to the blue key'), RS)[0])
    assert (cat != HIDDEN).all() and cat[6, 6] == GOAL_OBJECT
    # a goal location outside the room also prevents the crop (put next to)
    cat, _ = grid_of(abstract_states(make_state(objs, agent=(1, 3, 1))[None],
                                     oracle_selection('put the red ball next to the blue key'), RS)[0])
    assert (cat != HIDDEN).all() and cat[6, 6] == GOAL_LOCATION
    # a tile goal: inside the room -> crop; outside -> none
    cat, _ = grid_of(abstract_states(make_state(objs, agent=(1, 3, 1))[None], oracle_selection('go to the tile (3,3)'), RS)[0])
    assert cat[3, 3] == GOAL_LOCATION and cat[6, 6] == HIDDEN
    cat, _ = grid_of(abstract_states(make_state(objs, agent=(1, 3, 1))[None], oracle_selection('go to the tile (7,7)'), RS)[0])
    assert cat[7, 7] == GOAL_LOCATION and (cat != HIDDEN).all()
    # the agent in the bottom-right room crops to that room
    cat, _ = grid_of(abstract_states(make_state(objs, agent=(5, 7, 3))[None], oracle_selection('go to the blue key'), RS)[0])
    assert (cat[4:, 4:] != HIDDEN).all() and (cat[:4, :] == HIDDEN).all() and (cat[:, :4] == HIDDEN).all()


@pytest.mark.parametrize('agent,ball', [((4, 2, 0), (6, 2)), ((2, 4, 1), (2, 6)), ((6, 4, 3), (6, 6))])
def test_no_crop_when_the_agent_stands_in_a_doorway(agent, ball):
    """The goal object lies in the room the doorway's coordinates would point to: still no crop."""
    sel = oracle_selection('go to the red ball')
    s = make_state({ball: ('ball', 'red')}, agent=agent, doors={**DOORS, (6, 4): ('green', OPEN)})
    cat, _ = grid_of(abstract_states(s[None], sel, RS)[0])
    assert (cat != HIDDEN).all() and cat[ball] == GOAL_OBJECT
    inside = make_state({ball: ('ball', 'red')}, agent=(ball[0] - 1 if ball[0] % 4 != 1 else ball[0] + 1, ball[1], 0))
    assert (grid_of(abstract_states(inside[None], sel, RS)[0])[0] == HIDDEN).any(), 'one step into the room: cropped'


def test_carried_object_category():
    sel = oracle_selection('put the red ball next to the blue key')
    cases = {None: 0, ('box', 'green'): 1, ('ball', 'red'): 2, ('key', 'blue'): 3}
    out = abstract_states(np.stack([make_state(OBJS, carried=c) for c in cases]), sel, RS)
    assert out[:, -1].tolist() == list(cases.values())
    # a colourless goal object: any ball held is the goal object
    out = abstract_states(make_state(OBJS, carried=('ball', 'purple'))[None], oracle_selection('pick up a ball'), RS)
    assert out[0, -1] == 2


def test_abstract_text_contents():
    objs = {(2, 1): ('ball', 'red'), (3, 3): ('box', 'green')}
    a = abstract_states(make_state(objs, agent=(1, 1, 0))[None], oracle_selection('go to the red ball'), RS)[0]
    txt = abstract_text(a, RS)
    assert "View: the agent's room only, tiles (0,0) to (4,4)." in txt
    assert 'Goal object: (2,1).' in txt and 'Goal location: none.' in txt and 'Obstacles: (3,3).' in txt
    assert 'Doors: (4,2) closed, (2,4) closed.' in txt  # row by row
    assert 'Inventory: nothing.' in txt and 'Agent: at (1,1), facing east.' in txt
    assert 'In front of the agent: the goal object at (2,1).' in txt
    assert 'red' not in txt and 'ball' not in txt and 'green' not in txt
    a = abstract_states(make_state(objs, agent=(3, 2, 0), carried=('key', 'blue'))[None], oracle_selection('go to a door'), RS)[0]
    txt = abstract_text(a, RS)
    assert 'View: the whole 9x9 grid' in txt and 'In front of the agent: the goal object (closed) at (4,2).' in txt
    assert 'Inventory: an obstacle.' in txt
    a = abstract_states(make_state(objs, agent=(1, 2, 1))[None], oracle_selection('go to the red ball'), RS)[0]
    assert 'In front of the agent: empty floor at (1,3).' in abstract_text(a, RS)
    a = abstract_states(make_state(objs, agent=(1, 1, 3))[None], oracle_selection('go to the red ball'), RS)[0]
    assert 'In front of the agent: wall at (1,0).' in abstract_text(a, RS)


def test_open_door_goal_shows_its_state():
    "An open goal door reads 'open' (its state code 0 is also every ball's): the judge must see that it is open."
    doors = {k: (c, 0) for k, (c, _) in DOORS.items()}  # every door open
    sel = oracle_selection('go to a door')
    txt = abstract_text(abstract_states(make_state({}, agent=(3, 2, 0), doors=doors)[None], sel, RS)[0], RS)
    assert 'Goal object: (4,2) open, (2,4) open, (6,4) open, (4,6) open.' in txt and 'In front of the agent: the goal object (open) at (4,2).' in txt
    txt = abstract_text(abstract_states(make_state({(2, 1): ('ball', 'red')}, agent=(1, 1, 0), doors=doors)[None],
                                        oracle_selection('go to the red ball'), RS)[0], RS)
    assert 'Goal object: (2,1).' in txt and 'In front of the agent: the goal object at (2,1).' in txt


# ---------------------------------------------------------------- selections

@pytest.mark.parametrize('answer', [
    {'goal_objects': [{'color': 'pink', 'type': 'ball'}], 'goal_locations': []},        # unknown colour
    {'goal_objects': [{'color': 'red', 'type': 'sphere'}], 'goal_locations': []},       # unknown type
    {'goal_objects': [{'color': 'red'}], 'goal_locations': []},                         # missing type
    {'goal_objects': []},                                                                # missing goal_locations
    {'goal_locations': []},                                                              # missing goal_objects
    {'goal_objects': [], 'goal_locations': [], 'reason': 'x'},                           # extra key
    {'goal_objects': [{'color': 'red', 'type': 'ball', 'size': 2}], 'goal_locations': []},  # extra key in an object
    {'goal_objects': [], 'goal_locations': [{'tile': [1, 2, 3]}]},                       # three coordinates
    {'goal_objects': [], 'goal_locations': [{'tile': [1]}]},
    {'goal_objects': [], 'goal_locations': [{'tile': [-1, 2]}]},
    {'goal_objects': [], 'goal_locations': [{'tile': ['1', '2']}]},
    {'goal_objects': [], 'goal_locations': [{'tile': [3.0, 1.0]}]},                      # a float is no tile index
    {'goal_objects': [{'tile': [1, 2]}], 'goal_locations': []},                          # tiles are locations only
    {'goal_objects': [{'color': 'red', 'type': 'ball'}] * 5, 'goal_locations': []},      # too many
    {'goal_objects': {'color': 'red', 'type': 'ball'}, 'goal_locations': []},            # not a list
])
def test_selection_schema_rejects_malformed_answers(answer):
    with pytest.raises(ParseError, match='does not match the schema'):
        parse_json_answer('Here you go: ' + json.dumps(answer), SELECTION_SCHEMA)


def test_selection_schema_accepts_every_oracle_selection():
    world = World()
    for kind, instrs in synthetic_instructions(world).items():
        for ins in instrs[:: max(1, len(instrs) // 12)]:
            sel = oracle_selection(ins)
            assert parse_json_answer('```json\n' + json.dumps(sel) + '\n```', SELECTION_SCHEMA) == sel


@pytest.mark.parametrize('goal,expected', [
    ('go to the red ball', {'goal_objects': [{'color': 'red', 'type': 'ball'}], 'goal_locations': []}),
    ('go to a door', {'goal_objects': [{'color': None, 'type': 'door'}], 'goal_locations': []}),
    ('go to a purple object', {'goal_objects': [{'color': 'purple', 'type': 'object'}], 'goal_locations': []}),
    ('pick up a key', {'goal_objects': [{'color': None, 'type': 'key'}], 'goal_locations': []}),
    ('open the yellow door', {'goal_objects': [{'color': 'yellow', 'type': 'door'}], 'goal_locations': []}),
    ('put the grey box next to a ball', {'goal_objects': [{'color': 'grey', 'type': 'box'}],
                                         'goal_locations': [{'color': None, 'type': 'ball'}]}),
    ('go to the tile (3,1)', {'goal_objects': [], 'goal_locations': [{'tile': [3, 1]}]}),
])
def test_oracle_selection_for_every_goal_kind(goal, expected):
    assert oracle_selection(goal) == expected
    assert oracle_selection({'goal': 'a reworded goal', 'instruction': goal}) == expected


def test_canonical_selection_is_order_and_duplicate_free():
    a = {'goal_objects': [{'color': 'red', 'type': 'ball'}, {'type': 'key', 'color': None}, {'color': 'red', 'type': 'ball'}],
         'goal_locations': [{'tile': [1, 2]}]}
    b = {'goal_objects': [{'color': None, 'type': 'key'}, {'color': 'red', 'type': 'ball'}], 'goal_locations': [{'tile': [1, 2]}]}
    assert canonical_selection(a) == canonical_selection(b) and len(canonical_selection(a)['goal_objects']) == 2


GOALS = ['go to the red ball', 'pick up a key', 'open the yellow door', 'put the grey box next to a ball',
         'go to the tile (3,1)', 'go to a door', 'put a ball next to the green key']


def _goal_of(chat):
    return [m['content'] for m in chat if m['role'] == 'user'][-1].removeprefix('Goal: ')


def test_constrained_selections_can_spell_every_oracle_selection():
    """A chooser that follows the oracle's JSON: the grammar must be able to express every oracle selection."""
    targets = {g: json.dumps(oracle_selection(g)) for g in GOALS}
    def choose(c, options):
        done, target = c[-1]['content'], targets[_goal_of(c)]
        ok = [k for k, o in enumerate(options) if target.startswith(done + o)]
        assert len(ok) == 1, (done, options)
        return ok[0]
    be = ScriptedBackend(choose_fn=choose)
    out = constrained_selections(GOALS, LLM(LLMConfig('scripted'), None, backend=be))
    for g, rec in zip(GOALS, out):
        assert rec['selection'] == canonical_selection(oracle_selection(g)) and rec['source'] == 'llm'
        assert json.loads(rec['answer']) == oracle_selection(g)


@pytest.mark.parametrize('seed', range(6))
def test_constrained_selections_are_schema_valid_whatever_the_model_picks(seed):
    r = np.random.default_rng(seed)
    be = ScriptedBackend(choose_fn=lambda c, options: int(r.integers(len(options))))
    out = constrained_selections(GOALS, LLM(LLMConfig('scripted'), None, backend=be))
    for rec in out:
        assert parse_json_answer(rec['answer'], SELECTION_SCHEMA) is not None
        assert rec['selection'] == canonical_selection(json.loads(rec['answer']))
        # the selection can be applied
        abstract_states(make_state(OBJS)[None], rec['selection'], RS)


def test_model_output_is_parsed_never_executed(tmp_path):
    marker = tmp_path/'executed'
    payloads = [f"__import__('pathlib').Path({str(marker)!r}).write_text('x')",
                f"{{\"goal_objects\": __import__('pathlib').Path({str(marker)!r}).write_text('x'), \"goal_locations\": []}}",
                f"```python\nimport pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n```",
                '{"goal_objects": [{"color": "__import__(\'os\').system(\'true\')", "type": "ball"}], "goal_locations": []}']
    for p in payloads:
        with pytest.raises(ParseError): parse_json_answer(p, SELECTION_SCHEMA)
    be = ScriptedBackend(generate_fn=lambda c: payloads[len(c) % len(payloads)])
    out = llm_selections(['go to the red ball', 'pick up a key'], LLM(LLMConfig('scripted'), None, backend=be), retries=1)
    assert not marker.exists()
    for rec in out:
        assert rec['selection'] is None and rec['source'] == 'fallback:none' and rec['error'] and rec['answer'] in payloads


def test_llm_selections_generate_mode_keeps_valid_answers():
    ans = {'go to the red ball': json.dumps(oracle_selection('go to the red ball')), 'pick up a key': 'no idea'}
    be = ScriptedBackend(generate_fn=lambda c: ans[_goal_of(c[:10])])  # system + 4 worked examples + the goal
    out = llm_selections(list(ans), LLM(LLMConfig('scripted'), None, backend=be), retries=2)
    assert out[0]['selection'] == canonical_selection(oracle_selection('go to the red ball')) and out[0]['source'] == 'llm'
    assert out[1]['selection'] is None and out[1]['answer'] == 'no idea'


def test_generate_mode_re_asks_float_or_off_grid_tiles():
    """`{"tile": [3.0, 1.0]}` passed the schema (3.0 is an integer to JSON Schema) and then crashed the stage with an
    IndexError; a tile outside the known grid was silently dropped. Both are invalid answers now: re-asked, and
    counted as a fallback when the model never fixes them."""
    good = json.dumps(oracle_selection('go to the tile (3,1)'))
    ans = {'go to the tile (3,1)': ['{"goal_objects": [], "goal_locations": [{"tile": [3.0, 1.0]}]}', good],
           'go to the tile (2,2)': ['{"goal_objects": [], "goal_locations": [{"tile": [2, 9]}]}'] * 2}
    be = ScriptedBackend(generate_fn=lambda c: ans[_goal_of(c[:10])].pop(0))
    llm = LLM(LLMConfig('scripted'), None, backend=be)
    out = make_abstractions(list(ans), 'llm', llm, mode='generate', retries=1, grid=(W, H))
    assert out[0]['selection'] == canonical_selection(oracle_selection('go to the tile (3,1)')) and out[0]['source'] == 'llm'
    assert out[1]['selection'] is None and out[1]['source'] == 'fallback:none' and 'maximum' in out[1]['error']
    assert 'integer' in be.calls[1][1][0][-1]['content'] and llm.stats['unparseable'] == 1
    abstract_states(make_state(OBJS)[None], out[0]['selection'], RS)


def test_make_abstractions_sources_and_errors():
    o = make_abstractions(GOALS[:2], 'oracle')
    assert [r['selection'] for r in o] == [canonical_selection(oracle_selection(g)) for g in GOALS[:2]]
    assert all(r['selection'] is None and r['source'] == 'none' for r in make_abstractions(GOALS[:2], 'none'))
    with pytest.raises(ValueError, match='expected llm, oracle or none'): make_abstractions(GOALS, 'gpt')
    with pytest.raises(ValueError, match='expected constrained or generate'): make_abstractions(GOALS, 'llm', None, mode='beam')


def test_abstraction_report_ratios_at_most_one():
    world = World(); env = world.make_env(); states = []
    for seed in range(6):
        reset_layout(env, seed); states.append(encode_state(env))
        for a in (0, 2, 2, 1, 2, 2, 1, 2, 3, 2, 5):
            env.step(a); states.append(encode_state(env))
    states += [make_state({(2, 2): ('ball', 'red'), (6, 2): ('box', c)}) for c in COLORS]  # distractor colours only
    S = np.stack(states)
    abst = make_abstractions(GOALS, 'oracle') + make_abstractions(GOALS[:1], 'none')
    rows = abstraction_report(S, abst, world.room_size)
    X = len(unique_rows(S)[0])
    assert len(rows) == len(abst) and all(r['n_raw_states'] == X for r in rows)
    assert all(0 < r['ratio'] <= 1 and r['n_abstract_states'] <= X for r in rows)
    assert rows[-1]['ratio'] == 1.0 and min(r['ratio'] for r in rows) < 1.0


def test_unique_rows_round_trip():
    a = np.array([[1, 2], [3, 4], [1, 2], [0, 0]], np.uint8)
    u, inv = unique_rows(a)
    assert len(u) == 3 and np.array_equal(u[inv], a)


@pytest.mark.parametrize('mode', ['constrained', 'generate'])
def test_llm_abstractions_do_not_depend_on_threads_or_batch_size(tiny_llama, mode):
    "A real (tiny, random) transformer choosing abstractions: 1 vs 2 threads and batches of 4 vs 16 give the same answers."
    import torch
    from teduo.llm import LLM, LLMConfig
    n = torch.get_num_threads()
    goals = ['go to the red ball', 'put the blue box next to the grey ball', 'go to the tile (3, 2)']
    run = lambda bs, th: make_abstractions(goals, 'llm', LLM(LLMConfig(str(tiny_llama), dtype='float32', batch_size=bs, threads=th), None),
                                           mode=mode, **({'max_new_tokens': 12, 'retries': 0} if mode == 'generate' else {}))
    try:
        ref = run(16, 2)
        for bs, th in ((16, 1), (4, 2)): assert run(bs, th) == ref, f"abstractions changed with batch {bs}, threads {th}"
    finally: torch.set_num_threads(n)
