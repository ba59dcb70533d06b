"""Agents: the policy prompt and answer format, strict and longest-valid-prefix parsing, the LLM agent's open/closed
loop, its re-asks of unparseable answers (seeded, never frozen on a cached answer), the decode budget of the longest
SFT plan, batched vs one-at-a-time LLM agents on a tiny llama, and the tabular agent's lookup."""
import numpy as np
import pytest

from teduo.babyai import World, Goal, ACTIONS, reset_layout, encode_state, state_text
from teduo.abstract import make_abstractions, abstract_states, abstract_text
from teduo.policy_prompt import POLICY_SYSTEM, policy_chat, format_actions, parse_actions, parse_action_prefix, plan_token_budget
from teduo.agent import NOOP, RandomAgent, TabularAgent, LLMAgent, parse_answer, in_context_chat, IN_CONTEXT_EXAMPLES
from teduo.evaluate import make_episodes, run_episodes, answer_budget
from teduo.llm import LLM, LLMConfig
from fakes import ScriptedBackend, last_user, POLICY_ANSWERS

WORLD = World()
RS = WORLD.room_size


def start_states(seeds):
    env = WORLD.make_env()
    return [encode_state(reset_layout(env, s)) for s in seeds]


def selections(goals):
    return {a['instruction']: a['selection'] for a in make_abstractions(goals, 'oracle')}


# ---------------------------------------------------------------- prompt and answer format

def test_policy_chat_and_action_format_round_trip():
    c = policy_chat('go to the red ball', 'STATE TEXT')
    assert c == [{'role': 'system', 'content': POLICY_SYSTEM},
                 {'role': 'user', 'content': 'State:\nSTATE TEXT\nGoal: go to the red ball'}]
    r = np.random.default_rng(0)
    for n in (1, 2, 5, 17):
        acts = r.integers(len(ACTIONS), size=n).tolist()
        assert format_actions(acts) == '[' + ', '.join(map(str, acts)) + ']'
        assert parse_actions(format_actions(acts)) == acts == parse_answer(format_actions(acts))
    assert format_actions(np.array([2, 5])) == '[2, 5]'
    assert parse_actions(' [2,2 , 1] then I stop') == [2, 2, 1]


def test_parse_answer_with_chain_of_thought():
    assert parse_answer('The ball is ahead. Answer: [2, 3]', cot=True) == [2, 3]
    assert parse_answer('answer: [1] no wait. ANSWER: [0, 6]', cot=True) == [0, 6]  # the last answer counts
    with pytest.raises(ValueError, match="no 'Answer:'"): parse_answer('[2, 3]', cot=True)
    with pytest.raises(ValueError): parse_answer('Answer: go forward', cot=True)


@pytest.mark.parametrize('bad', ['', 'move forward', '2, 2, 1', '[]', '[ ]', '[7]', '[2, 9]', '[12]', '[2, x]', '[1, 2,]',
                                 '(2, 1)', 'Answer: [2]', '[-1]', '[2.5]'])
def test_malformed_answers_are_refused(bad):
    with pytest.raises(ValueError): parse_actions(bad)


@pytest.mark.parametrize('text,want', [
    ('[2, 2, 1]', [2, 2, 1]), (' [2,2 , 1] then I stop', [2, 2, 1]), ('[2, 2, 1, 3', [2, 2, 1, 3]),  # cut by the budget
    ('[2, 2, 1, ', [2, 2, 1]), ('[2, 9, 1]', [2]), ('[1, 2,]', [1, 2]), ('[2, x, 1]', [2]), ('[0, 12]', [0]),
    ('[2, 5 and then 3]', [2]), ('[6]', [6]), ('[3]\n[4]', [3])])
def test_answers_are_acted_out_as_far_as_they_are_valid(text, want):
    assert parse_action_prefix(text) == parse_answer(text) == want
    assert parse_answer('First I turn. Answer: ' + text, cot=True) == want


@pytest.mark.parametrize('bad', ['', 'move forward', '2, 2, 1', '[]', '[ ]', '[7]', '[12]', '[-1]', '[2.5]', '(2, 1)', 'Answer: [2]',
                                 '[x, 2]', '[, 2]'])
def test_answers_without_a_valid_prefix_are_unparseable(bad):
    with pytest.raises(ValueError): parse_action_prefix(bad)


def test_in_context_prompt_holds_the_worked_examples():
    c = in_context_chat('go to a key', 'S', cot=True)
    assert len(c) == 1 + 2*len(IN_CONTEXT_EXAMPLES) + 1 and c[-1]['content'] == 'State:\nS\nGoal: go to a key'
    assert all(m['content'].split('Answer: ')[-1] == format_actions(ex[3]) for m, ex in zip(c[2::2], IN_CONTEXT_EXAMPLES))
    assert "end with 'Answer: '" in c[0]['content']
    assert [m['content'] for m in in_context_chat('g', 'S')[2::2]] == [format_actions(ex[3]) for ex in IN_CONTEXT_EXAMPLES]


# ---------------------------------------------------------------- the LLM agent with a scripted model

def scripted_agent(answers, **kw):
    "An LLM agent whose model answers `answers[goal]` (a string, or a list consumed one query at a time)."
    queue = {g: list(a) if isinstance(a, list) else None for g, a in answers.items()}
    def gen(c):
        g = last_user(c).rsplit('Goal: ', 1)[1]
        return queue[g].pop(0) if queue[g] is not None else answers[g]
    be = ScriptedBackend(generate_fn=gen)
    return LLMAgent(LLM(LLMConfig('scripted'), None, backend=be), {}, RS, **kw), be


S = start_states(range(12))  # a new state every step (a repeated prompt would be answered from the LLM cache)


def _steps(agent, goals, n):
    "n steps of len(goals) episodes; (actions, invalid) per episode."
    acts, inv = [], []
    for t in range(n):
        a, i = agent.act(S[t:t + len(goals)], goals, list(range(len(goals)))); acts.append(a.tolist()); inv.append(i.tolist())
    return np.array(acts).T.tolist(), np.array(inv).T.tolist()


def test_invalid_answers_become_counted_noops():
    agent, be = scripted_agent({'g ok': '[2, 1]', 'g bad': 'I would go forward', 'g empty': '[]'}, replan_every=None)
    agent.reset(3)
    acts, inv = _steps(agent, ['g ok', 'g bad', 'g empty'], 2)
    assert acts[0] == [2, 1] and inv[0] == [False, False]
    assert acts[1] == [NOOP, NOOP] and inv[1] == [True, True] and acts[2] == [NOOP, NOOP] and inv[2] == [True, True]
    # each step, an unparseable answer is re-asked twice (sampled) before the step becomes a no-op; the next step asks again
    assert agent.queries == 1 + 2*2 and agent.reasks == 2*2*2 and agent.invalid_answers == 2*2*3 and agent.unanswered == 4
    c = agent.episode_counts()
    assert c['answers'].tolist() == [1, 6, 6] and c['unparseable_answers'].tolist() == [0, 6, 6] and c['retries'].tolist() == [0, 4, 4]
    assert be.n_prompts() == 1 + 2*2*3, 'a re-ask is a call of its own'
    none, be = scripted_agent({'g': 'no idea'}, replan_every=None, retries=0)  # retries 0 (or retry_temperature 0): no re-asks
    none.reset(1); _steps(none, ['g'], 2)
    assert none.reasks == 0 and none.invalid_answers == 2 and be.n_prompts() == 2
    assert NOOP == ACTIONS.index('done')


class Sampling:
    "A backend whose answer is fn(chat, temperature, seed); it records (temperature, seed) of every prompt it answers."
    def __init__(self, fn): self.fn, self.asked = fn, []
    def generate(self, chats, max_new_tokens, temperature, seed, progress=False):
        seeds = list(seed) if isinstance(seed, list) else [seed]*len(chats)  # re-asks: one seed per chat
        self.asked += [(temperature, s) for s in seeds]
        return [(self.fn(c, temperature, s), 10, 3) for c, s in zip(chats, seeds)]


def sampling_agent(fn, **kw):
    be = Sampling(fn)
    return LLMAgent(LLM(LLMConfig('scripted'), None, backend=be), {}, RS, **kw), be


def test_an_unparseable_answer_followed_by_a_valid_reask_unfreezes_the_episode():
    "Greedy decoding answers garbage in every state; a sampled re-ask answers a plan: the episode moves, in the same step."
    fn = lambda c, t, s: '[1, 1, 2]' if t > 0 else 'Sure, let me think about it'
    specs, _ = make_episodes(WORLD, 'q', ['go to the red ball'], list(range(4)), 1, seed=0)
    frozen, _ = sampling_agent(fn, replan_every=1, retries=0)
    log, traj = run_episodes(frozen, specs, WORLD, max_steps=5, keep_states=1, progress=False)
    assert log.unparseable_steps[0] == 5 and all((s == traj[0][0]).all() for s in traj[0]), 'without re-asks: frozen'
    agent, be = sampling_agent(fn, replan_every=1, retries=2, retry_temperature=0.7)
    log, traj = run_episodes(agent, specs, WORLD, max_steps=5, keep_states=1, progress=False)
    assert log.unparseable_steps[0] == 0 and log.answers[0] == 2*log.steps[0] and log.retries[0] == log.steps[0]
    assert log.unparseable_answers[0] == log.steps[0] and any((s != traj[0][0]).any() for s in traj[0])
    assert {t for t, _ in be.asked} == {0.0, 0.7} and len({s for t, s in be.asked if t > 0}) == log.steps[0], 'a seed per step'


def test_a_failed_step_is_asked_again_with_new_seeds_not_the_cached_failure():
    """All tries of step 0 fail; the no-op leaves the state unchanged, so step 1's greedy answer comes from the cache, but its
    re-asks have new seeds (part of the cache key) and succeed."""
    tries = iter(['no', 'still no', 'nope'] + ['[2]']*20)
    agent, be = sampling_agent(lambda c, t, s: next(tries) if t > 0 else 'garbage', replan_every=None, retries=2)
    agent.reset(1)
    s0 = S[0]
    a0, bad0 = agent.act([s0], ['g'], [0])
    a1, bad1 = agent.act([s0], ['g'], [0])  # the same state and prompt: `done` changed nothing
    assert (a0.tolist(), bad0.tolist(), a1.tolist(), bad1.tolist()) == ([NOOP], [True], [2], [False])
    # step 0: the greedy answer and 2 re-asks; step 1: the greedy answer from the cache, a 3rd failure, then the plan
    assert agent.llm.stats['cache_hits'] == 1 and be.asked[0] == (0.0, 0) and len(be.asked) == 1 + 2 + 2
    seeds = [s for t, s in be.asked if t > 0]
    assert len(set(seeds)) == 4 and agent.unanswered == 1 and agent.reasks == 4


def test_reasks_are_seeded_by_episode_not_by_batch_position():
    "The re-ask seed comes from (agent seed, goal, start state, step, attempt): batched and one-episode runs agree, and so do two runs."
    fn = lambda c, t, s: f"[{s % 6}, {s // 7 % 6}]" if t > 0 and s % 3 else 'hmm'
    specs, _ = make_episodes(WORLD, 'q', ['go to the red ball', 'open a door'], list(range(6)), 3, seed=0)
    logs = [run_episodes(sampling_agent(fn, replan_every=None, seed=seed)[0], specs, WORLD, max_steps=6, keep_states=len(specs),
                         progress=False) for seed in (0, 0, 1)]
    assert logs[0][0].equals(logs[1][0]) and not logs[0][0].equals(logs[2][0])
    cols = ['success', 'steps', 'unparseable_steps', 'no_effect_actions', 'answers', 'unparseable_answers', 'retries']
    for i, sp in enumerate(specs[::-1]):  # one at a time, in another order
        one, traj = run_episodes(sampling_agent(fn, replan_every=None)[0], [sp], WORLD, max_steps=6, keep_states=1, progress=False)
        j = len(specs) - 1 - i
        assert one.iloc[0][cols].tolist() == logs[0][0].iloc[j][cols].tolist()
        assert all((x == y).all() for x, y in zip(traj[0], logs[0][1][j]))
    assert logs[0][0].retries.sum() > 0


def test_the_decode_budget_covers_the_longest_sft_plan(tiny_llama, root):
    "plan_token_budget(max_plan_len) tokens decode any plan of max_plan_len actions (SmolLM2's tokenizer), end of turn included."
    import yaml
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    n = yaml.safe_load((root/'params.yaml').read_text())['sft_data']['max_plan_len']
    budget = answer_budget('auto', n)
    assert budget == plan_token_budget(n) == 3*n + 2 and answer_budget(24, n) == 24
    r = np.random.default_rng(0)
    plans = [[a]*n for a in range(len(ACTIONS))] + [r.integers(len(ACTIONS), size=n).tolist() for _ in range(50)]
    for plan in plans:
        for text in (format_actions(plan), ' ' + format_actions(plan)):
            assert len(tok(text, add_special_tokens=False)['input_ids']) + 1 <= budget
    class Truncating:
        "A model that answers the plan, cut to `max_new_tokens` tokens as a decoder would cut it."
        def generate(self, chats, max_new_tokens, temperature, seed, progress=False):
            ids = tok(format_actions(plans[-1]), add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
            return [(tok.decode(ids[:max_new_tokens], skip_special_tokens=True), 10, min(len(ids), max_new_tokens)) for _ in chats]
    for mnt, acted in ((budget, n), (24, 8)):  # the old 24-token budget: the first 8 actions, still acted out
        agent = LLMAgent(LLM(LLMConfig('scripted'), None, backend=Truncating()), {}, RS, replan_every=None, max_new_tokens=mnt)
        agent.reset(1)
        got = [int(agent.act([S[0]], ['g'], [0])[0][0]) for _ in range(acted)]
        assert got == plans[-1][:acted] and agent.queries == 1 and agent.invalid_answers == 0


def test_closed_loop_asks_every_step_open_loop_runs_the_plan():
    closed, be = scripted_agent({'g': ['[2, 1, 3]', '[1, 3]', '[3]', '[4, 4]']}, replan_every=1)
    closed.reset(1)
    assert _steps(closed, ['g'], 4)[0] == [[2, 1, 3, 4]] and closed.queries == 4 and be.n_prompts() == 4
    opened, be = scripted_agent({'g': ['[2, 1, 3]', '[5]', '[0, 0]']}, replan_every=None)
    opened.reset(1)
    assert _steps(opened, ['g'], 6)[0] == [[2, 1, 3, 5, 0, 0]] and opened.queries == 3 and be.n_prompts() == 3
    every2, be = scripted_agent({'g': ['[2, 1, 3]', '[4, 5, 6]', '[0]']}, replan_every=2)
    every2.reset(1)
    assert _steps(every2, ['g'], 5)[0] == [[2, 1, 4, 5, 0]] and every2.queries == 3


def test_agent_tracks_each_episode_separately():
    agent, be = scripted_agent({'a': ['[1, 1]', '[3]'], 'b': ['[2]', '[4]', '[5]']}, replan_every=None)
    agent.reset(2)
    a1, _ = agent.act(S[0:2], ['a', 'b'], [0, 1])
    a2, _ = agent.act(S[2:4], ['a', 'b'], [0, 1])   # 'a' still has a queued action: only 'b' asks again
    a3, _ = agent.act(S[4:5], ['b'], [1])           # episode 0 has ended: only episode 1 runs
    assert a1.tolist() == [1, 2] and a2.tolist() == [1, 4] and a3.tolist() == [5] and agent.queries == 4


def test_agent_prompt_shows_the_abstract_state_when_the_goal_is_known():
    s = start_states([3])[0]
    sel = selections(['go to a key'])
    sel['find a key'] = sel['go to a key']  # selections are looked up by the goal text the agent sees
    agent = LLMAgent(None, sel, RS)
    known = agent.chat(s, Goal('find a key', 'go to a key'))
    assert known == policy_chat('find a key', abstract_text(abstract_states(s[None], sel['go to a key'], RS)[0], RS))
    unseen = agent.chat(s, Goal('locate a key', 'go to a key'))  # the instruction alone never leaks to the policy
    assert unseen[1]['content'] == f"State:\n{state_text(s)}\nGoal: locate a key"
    assert agent.chat(s, Goal.of('pick up a ball'))[1]['content'] == f"State:\n{state_text(s)}\nGoal: pick up a ball"
    ic = LLMAgent(None, sel, RS, prompt='in_context', cot=True).chat(s, Goal.of('go to a key'))
    assert ic[0]['content'].startswith(POLICY_SYSTEM) and len(ic) == 2 + 2*len(IN_CONTEXT_EXAMPLES)
    with pytest.raises(ValueError, match='expected teduo or in_context'): LLMAgent(None, sel, RS, prompt='react')


def test_raw_state_baselines_and_their_worked_examples():
    """The untuned baselines see the full state text (paper Fig. C.9) even for a goal with an abstraction; their worked
    examples come from a layout outside the evaluated ones, and replaying an example's actions achieves its goal."""
    from teduo.agent import raw_in_context_examples
    from teduo.babyai import EXAMPLE_LAYOUT, achieved
    from teduo.collect import start_episode
    from teduo.core import stable_seed
    s = start_states([3])[0]
    sel = selections(['go to a key'])
    raw = LLMAgent(None, sel, RS, state='raw').chat(s, Goal.of('go to a key'))
    assert raw == policy_chat('go to a key', state_text(s))
    ex = raw_in_context_examples(WORLD)
    assert [e[0].split(' the ')[0] for e in ex] == ['go to', 'pick up', 'open'] and ex == raw_in_context_examples(WORLD)
    for goal, text, why, acts in ex:
        assert 1 <= len(acts) <= 4 and text.startswith('Grid: ')
        for attempt in range(200):  # the start each example shows: the same text as a seeded start of its layout
            env = start_episode(WORLD.make_env(), EXAMPLE_LAYOUT, stable_seed(0, 'in-context-example', goal, attempt))
            if state_text(encode_state(env)) == text: break
        else: raise AssertionError(f"no start of layout {EXAMPLE_LAYOUT} shows {goal!r}'s example state")
        for a in acts: env.step(a)
        assert achieved(encode_state(env), goal, acts[-1])
    ic = LLMAgent(None, sel, RS, prompt='in_context', state='raw', examples=ex).chat(s, Goal.of('go to a key'))
    assert [m['content'] for m in ic[2:-1:2]] == [format_actions(e[3]) for e in ex]
    assert ic[1]['content'] == f"State:\n{ex[0][1]}\nGoal: {ex[0][0]}" and ic[-1]['content'] == f"State:\n{state_text(s)}\nGoal: go to a key"
    with pytest.raises(ValueError, match='expected abstract or raw'): LLMAgent(None, sel, RS, state='pixels')


# ---------------------------------------------------------------- batching on a tiny llama

GOALS16 = list(POLICY_ANSWERS) * 4


def test_batched_and_unbatched_llm_agents_pick_identical_actions(tiny_policy_llama):
    states, sel = start_states(range(16)), selections(list(POLICY_ANSWERS))
    mk = lambda bs: LLMAgent(LLM(LLMConfig(str(tiny_policy_llama), dtype='float32', batch_size=bs)), sel, RS,
                             replan_every=None, max_new_tokens=16)
    batched = mk(16); batched.reset(16)
    a, inv = batched.act(states, GOALS16, list(range(16)))
    one = mk(1); one.reset(16)
    singles = [one.act([states[e]], [GOALS16[e]], [e]) for e in range(16)]
    assert a.tolist() == [int(x[0][0]) for x in singles] and inv.tolist() == [bool(x[1][0]) for x in singles]
    assert (~inv).sum() >= 8, 'the stand-in policy must mostly answer valid action lists'
    assert len(set(a[~inv].tolist())) >= 2
    assert batched.queries == one.queries == 16 and batched.reasks == one.reasks
    assert batched.llm.stats['calls'] == one.llm.stats['calls'] == 16 + batched.reasks


def test_batched_rollouts_equal_one_episode_at_a_time(tiny_policy_llama):
    specs, skipped = make_episodes(WORLD, 'q', list(POLICY_ANSWERS), list(range(8)), 2, seed=0)
    assert len(specs) >= 6 and not skipped
    sel = selections(list(POLICY_ANSWERS))
    mk = lambda bs: LLMAgent(LLM(LLMConfig(str(tiny_policy_llama), dtype='float32', batch_size=bs)), sel, RS,
                             replan_every=None, max_new_tokens=16)
    log, traj = run_episodes(mk(16), specs, WORLD, max_steps=6, keep_states=len(specs), progress=False)
    single = mk(1)
    for i, sp in enumerate(specs):
        l1, t1 = run_episodes(single, [sp], WORLD, max_steps=6, keep_states=1, progress=False)
        cols = ['success', 'steps', 'unparseable_steps', 'no_effect_actions', 'answers', 'unparseable_answers', 'retries']
        assert l1.iloc[0][cols].tolist() == log.iloc[i][cols].tolist()
        assert len(t1[0]) == len(traj[i]) and all((x == y).all() for x, y in zip(t1[0], traj[i]))
    assert log.unparseable_steps.sum() < log.steps.sum()


# ---------------------------------------------------------------- tabular and random agents

def test_tabular_agent_looks_up_greedy_actions():
    g = 'go to the red ball'
    sel = selections([g])
    s = start_states([0, 1, 2])
    A = abstract_states(np.stack(s[:2]), sel[g], RS)  # the agent knows two abstract states
    q = np.full((2, len(ACTIONS)), np.nan); q[0, [1, 2]] = [0.1, 0.5]; q[1, 5] = 0.2
    agent = TabularAgent([q], [A], [g], sel, RS, seed=0, name='tab')
    agent.reset(3)
    acts, inv = agent.act(s[:2], [g, g], [0, 1])
    assert acts.tolist() == [2, 5] and not inv.any() and agent.unknown == 0 and agent.name == 'tab'
    acts, _ = agent.act([s[2]], [g], [2])  # an unseen abstract state: a random action, counted
    assert 0 <= acts[0] < len(ACTIONS) and agent.unknown == 1
    assert agent.knows(g) and not agent.knows('pick up a key')
    with pytest.raises(KeyError, match='unknown goal'): agent.act([s[0]], ['pick up a key'], [0])
    with pytest.raises(KeyError, match='unknown goal'):  # looked up by the text it sees: a rewording is unknown
        agent.act([s[0]], [Goal('reach the red ball', g)], [0])
    q2 = np.full((2, len(ACTIONS)), np.nan)  # a known state without any observed action: random, counted
    agent = TabularAgent([q2], [A], [g], sel, RS); agent.reset(1); agent.act([s[0]], [g], [0])
    assert agent.unknown == 1


def test_random_agent_is_seeded():
    s = start_states([0])*5
    a, b, c = RandomAgent(0), RandomAgent(0), RandomAgent(1)
    for x in (a, b, c): x.reset(5)
    ra, rb, rc = (x.act(s, ['g']*5, list(range(5)))[0] for x in (a, b, c))
    assert ra.tolist() == rb.tolist() and ra.tolist() != rc.tolist() and ((ra >= 0) & (ra < len(ACTIONS))).all()


# ---------------------------------------------------------------- other policy formats (params sft_data.prompt)

def test_an_agent_asks_and_acts_in_its_adapters_format():
    "Words + next action: the prompt names actions as words, each answer gives one action, text after it is ignored."
    from teduo.policy_prompt import PolicyFormat, policy_system
    f = PolicyFormat('egocentric', 'words', 'next')
    agent, be = scripted_agent({'g': ['move forward', 'turn left, then pick up', 'Pick up.', 'go somewhere', 'toggle']},
                               replan_every=None, fmt=f, retries=0)
    agent.reset(1)
    acts, inv = _steps(agent, ['g'], 5)
    assert acts[0] == [2, 0, 3, NOOP, 5] and inv[0] == [False, False, False, True, False] and agent.queries == 5
    assert all(c[0]['content'] == policy_system(f) for o, cs in be.calls for c in cs)
    paper, _ = scripted_agent({'g': 'move forward'}, replan_every=None, retries=0)  # the paper's format does not read words
    paper.reset(1); assert _steps(paper, ['g'], 1)[1] == [[True]]


def test_an_egocentric_agent_shows_the_egocentric_abstract_state():
    from teduo.policy_prompt import PolicyFormat
    from teduo.abstract import egocentric_text
    s = start_states([3])[0]
    sel = selections(['go to a key'])
    agent = LLMAgent(None, sel, RS, fmt=PolicyFormat(state='egocentric'))
    want = egocentric_text(abstract_states(s[None], sel['go to a key'], RS)[0], RS)
    assert agent.chat(s, Goal.of('go to a key'))[1]['content'] == f"State:\n{want}\nGoal: go to a key"
    ic = LLMAgent(None, sel, RS, prompt='in_context', state='abstract', fmt=PolicyFormat(state='egocentric'))
    assert 'Agent: at (' in ic.chat(s, Goal.of('go to a key'))[-1]['content'], 'the untuned baselines keep the paper format'


def test_an_episode_back_in_a_state_it_asked_in_is_sampled_not_frozen():
    "Greedy in a repeated state would repeat the answer that led back there: that ask is sampled, seeded by episode and step."
    fn = lambda c, t, s: '[2]' if t == 0 else '[1]'
    agent, be = sampling_agent(fn, replan_every=None, loop='sample', loop_temperature=1.0)
    agent.reset(2)
    a1, _ = agent.act([S[0], S[1]], ['g', 'g'], [0, 1])
    a2, _ = agent.act([S[0], S[2]], ['g', 'g'], [0, 1])  # episode 0 is back in its first state; episode 1 is somewhere new
    assert a1.tolist() == [2, 2] and a2.tolist() == [1, 2] and agent.loop_asks == 1
    assert agent.episode_counts()['loop_asks'].tolist() == [1, 0]
    assert [t for t, _ in be.asked] == [0.0, 0.0, 0.0, 1.0]
    again, be2 = sampling_agent(fn, replan_every=None, loop='sample', loop_temperature=1.0)
    again.reset(2); again.act([S[0], S[1]], ['g', 'g'], [0, 1]); again.act([S[0], S[2]], ['g', 'g'], [0, 1])
    assert be2.asked == be.asked, 'the same seeds in every run'
    greedy, _ = sampling_agent(fn, replan_every=None)  # loop 'repeat': greedy as before
    greedy.reset(1); greedy.act([S[0]], ['g'], [0])
    assert greedy.act([S[0]], ['g'], [0])[0].tolist() == [2] and greedy.loop_asks == 0


class Scoring(Sampling):
    "Sampling, plus `score`: the log-probs of each choice are fixed by `prefs` (choice -> log-prob); it records the choices."
    def __init__(self, fn, prefs):
        super().__init__(fn); self.prefs, self.scored = prefs, []
    def score(self, chats, choices, progress=False):
        self.scored.append(list(choices))
        return np.array([[self.prefs.get(c, -50.0) for c in choices] for _ in chats]), [10]*len(chats)


def test_loop_untried_takes_the_best_action_not_yet_taken_in_a_repeated_state():
    "Back in a state it acted in, the agent takes the best-scored action it has not tried there; all tried: the best one."
    from teduo.policy_prompt import PolicyFormat
    f = PolicyFormat('coords', 'words', 'next')
    be = Scoring(lambda c, t, s: 'turn left', {'turn left': -0.1, 'move forward': -1.0, 'toggle': -2.0})
    agent = LLMAgent(LLM(LLMConfig('scripted'), None, backend=be), {}, RS, replan_every=None, fmt=f, loop='untried')
    agent.reset(2)
    steps = [agent.act([S[0], S[1]], ['g', 'g'], [0, 1])[0].tolist() for _ in range(3)]
    # episode 0 stays in S[0] (the test does not move it): turn left (greedy), then the untried best: forward, toggle
    assert [a[0] for a in steps] == [0, 2, 5] and agent.loop_asks == 4 and agent.counts['loop_asks'].tolist() == [2, 2]
    assert be.scored[0] == ['turn left', 'turn right', 'move forward', 'pick up', 'drop', 'toggle', 'done']
    assert [t for t, _ in be.asked] == [0.0, 0.0], 'a repeated state is scored, not generated again'
    for _ in range(5): last = agent.act([S[0]], ['g'], [0])[0].tolist()
    assert last == [0], 'every action tried there: the best-scored one again'
    paper = LLMAgent(LLM(LLMConfig('scripted'), None, backend=be), {}, RS, loop='untried')
    assert paper.first_words()[2] == '[2', "the paper's format: an answer starts with its list"
    with pytest.raises(ValueError, match="loop 'sample' needs loop_temperature"): LLMAgent(None, {}, RS, loop='sample', loop_temperature=0)
    with pytest.raises(ValueError, match='chain-of-thought'): LLMAgent(None, {}, RS, prompt='in_context', cot=True, loop='untried')
    with pytest.raises(ValueError, match="loop 'again': expected"): LLMAgent(None, {}, RS, loop='again')
