"""The LLM layer: the OpenAI-compatible backend against a local server, the persistent answer cache, strict parsing
with bounded retries, and the transformers backend's scoring / constrained choice / batched generation checked
against brute-force references on a tiny random llama."""
import json, sqlite3, threading, time, warnings

import numpy as np
import pytest

import teduo.llm as tl
from teduo.llm import (LLM, LLMConfig, LLMCache, OpenAIBackend, TransformersBackend, Unparseable, ParseError,
                       parse_json_answer, parse_choice)
from fakes import FakeOpenAI, ScriptedBackend, last_user, raw_reply, trickle


def chat(text, system=None):
    return ([{'role': 'system', 'content': system}] if system else []) + [{'role': 'user', 'content': text}]


@pytest.fixture
def server():
    with FakeOpenAI() as s: yield s


@pytest.fixture
def no_sleep(monkeypatch):
    "Record the backoff sleeps of the HTTP client instead of sleeping."
    slept = []
    monkeypatch.setattr(tl.time, 'sleep', lambda s: slept.append(s))
    return slept


def openai_llm(server, cache=None, **kw):
    return LLM(LLMConfig(model='test-model', backend='openai', base_url=server.url, **kw), cache)


# ---------------------------------------------------------------- OpenAI-compatible backend

def test_openai_generate_sends_protocol_fields_and_counts_tokens(server):
    llm = openai_llm(server)
    chats = [chat('hello there', system='be brief'), chat('second prompt')]
    out = llm.generate(chats, max_new_tokens=7, temperature=0.5, seed=3)
    assert out == ['echo: hello there', 'echo: second prompt']
    assert len(server.requests) == 2
    for path, headers, body in server.requests:
        assert path == '/v1/chat/completions'
        assert body['model'] == 'test-model' and body['max_tokens'] == 7 and body['temperature'] == 0.5 and body['seed'] == 3
        assert headers['Content-Type'] == 'application/json'
    assert sorted(json.dumps(b['messages']) for _, _, b in server.requests) == sorted(json.dumps(c) for c in chats)
    # usage: prompt words (2 + 2, then 2) and completion words (3 + 3)
    assert llm.stats['prompt_tokens'] == 6 and llm.stats['completion_tokens'] == 6 and llm.stats['calls'] == 2


def test_openai_api_key_header_only_when_the_variable_is_set(server, monkeypatch):
    monkeypatch.delenv('TEDUO_TEST_KEY', raising=False)
    openai_llm(server, api_key_env='TEDUO_TEST_KEY').generate([chat('a')])
    assert 'Authorization' not in server.requests[-1][1]
    monkeypatch.setenv('TEDUO_TEST_KEY', 'sk-test')
    openai_llm(server, api_key_env='TEDUO_TEST_KEY').generate([chat('b')])
    assert server.requests[-1][1]['Authorization'] == 'Bearer sk-test'


def test_openai_score_maps_top_logprobs_to_choices(server):
    """Tokens are matched case- and space-insensitively (the best of ' no'/'NO' wins); a choice absent from the
    top log-probs is -inf in the backend and a large negative number (never NaN or a default) in `LLM.score`."""
    lp, ntok = OpenAIBackend(LLMConfig('test-model', 'openai', base_url=server.url)).score([chat('q one')], ['Yes', 'No', 'absent'])
    assert lp.shape == (1, 3) and lp[0, 0] == -0.25 and lp[0, 1] == -1.5 and lp[0, 2] == -np.inf and ntok == [2]
    body = server.requests[-1][2]
    assert body['logprobs'] is True and body['top_logprobs'] >= 2 and body['max_tokens'] == 1 and body['temperature'] == 0.0
    llm = openai_llm(server)
    s = llm.score([chat('q one'), chat('q two two')], ['no', 'maybe', 'absent'])
    np.testing.assert_array_equal(s[:, :2], [[-1.5, -4.0], [-1.5, -4.0]])
    assert (s[:, 2] <= -1e29).all() and np.isfinite(s).all()
    assert llm.stats['prompt_tokens'] == 2 + 3


def test_openai_retries_server_errors_then_succeeds(server, no_sleep):
    server.script = [(500, {'error': 'busy'}), (503, {'error': 'busy'})]
    assert openai_llm(server).generate([chat('retry me')]) == ['echo: retry me']
    assert len(server.requests) == 3 and no_sleep == [0.5, 1.0]


def test_openai_gives_up_after_three_server_errors(server, no_sleep):
    server.script = [(500, {'error': 'down'})] * 3
    with pytest.raises(ConnectionError, match='no answer after 3 attempts'):
        openai_llm(server).generate([chat('x')])
    assert len(server.requests) == 3


def test_openai_client_error_is_clear_and_not_retried(server, no_sleep):
    server.script = [(400, {'error': {'message': 'unknown model test-model'}})]
    with pytest.raises(RuntimeError, match=r'HTTP 400.*unknown model'):
        openai_llm(server).generate([chat('x')])
    assert len(server.requests) == 1 and no_sleep == []


def test_openai_malformed_responses_are_clear_errors(server):
    server.script = [(200, {'choices': []})]
    with pytest.raises(ValueError, match='malformed response'): openai_llm(server).generate([chat('x')])
    server.script = [(200, {'id': 'no choices at all'})]
    with pytest.raises(ValueError, match='malformed response'): openai_llm(server).generate([chat('y')])
    server.script = [(200, {'choices': [{'message': {'content': 'Yes'}}]})]  # logprobs asked for, none given
    with pytest.raises(ValueError, match='without logprobs'): openai_llm(server).score([chat('z')], ['Yes', 'No'])


def test_openai_non_json_body_names_the_server(server):
    server.script = [(200, b'<html>proxy error</html>')]
    with pytest.raises(ValueError, match='127.0.0.1'):
        openai_llm(server).generate([chat('x')])


BROKEN_REPLIES = {  # what a crashing server or a proxy can send: http.client raises these, not urllib
    'IncompleteRead': raw_reply(b'HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n{"choi'),
    'BadStatusLine': raw_reply(b'garbage instead of a status line\r\n\r\n'),
    'RemoteDisconnected': raw_reply(b''),
}


@pytest.mark.parametrize('kind', list(BROKEN_REPLIES))
def test_openai_retries_broken_connections(server, no_sleep, kind):
    server.script = [(200, BROKEN_REPLIES[kind])]
    assert openai_llm(server).generate([chat('again')]) == ['echo: again']
    assert len(server.requests) == 2 and no_sleep == [0.5]


def test_openai_broken_connections_give_an_error_naming_the_url(server, no_sleep):
    server.script = [(200, BROKEN_REPLIES['BadStatusLine'])] * 3
    with pytest.raises(ConnectionError, match=rf"{server.url}/chat/completions: no answer after 3 attempts.*BadStatusLine"):
        openai_llm(server).generate([chat('x')])


def test_openai_timeout_bounds_the_whole_request(server):
    """A server trickling its answer (a piece every 0.2 s for 6 s) never trips a per-read timeout of 1 s: the
    deadline is the whole request, then the request is retried (the second answer comes at once)."""
    slow = server.default('/v1/chat/completions', {'model': 'test-model', 'messages': chat('slow')})[1]
    server.script = [(200, trickle(200, slow, seconds=6.0))]
    t = time.monotonic()
    assert openai_llm(server, timeout_s=1.0).generate([chat('fast')]) == ['echo: fast']
    assert time.monotonic() - t < 3.0 and len(server.requests) == 2


def test_openai_constrained_choice_is_refused_clearly(server):
    with pytest.raises(NotImplementedError, match='token-level access'):
        openai_llm(server).choose([chat('x')], ['a', 'b'])


def test_config_from_params_refuses_bad_values():
    assert LLMConfig.from_params({'model': 'm', 'backend': 'openai', 'base_url': 'http://h/v1'}).base_url == 'http://h/v1'
    with pytest.raises(ValueError, match='needs base_url'): LLMConfig.from_params({'model': 'm', 'backend': 'openai'})
    with pytest.raises(ValueError, match='backend'): LLMConfig.from_params({'model': 'm', 'backend': 'vllm'})
    with pytest.raises(ValueError, match='dtype'): LLMConfig.from_params({'model': 'm', 'dtype': 'int8'})
    with pytest.raises(ValueError, match='unknown keys'): LLMConfig.from_params({'model': 'm', 'modle': 'x'})
    with pytest.raises(ValueError, match='missing keys'): LLMConfig.from_params({'backend': 'openai'})


# ---------------------------------------------------------------- the persistent cache

def test_cache_second_identical_call_hits_across_instances(server, tmp_path):
    db = tmp_path/'cache'/'llm.sqlite'
    chats = [chat('one'), chat('two'), chat('three')]
    a = openai_llm(server, db)
    first = a.generate(chats, max_new_tokens=5)
    a.score(chats[:2], ['yes', 'no'])
    n = len(server.requests)
    assert n == 5 and a.stats['calls'] == 5 and a.stats['cache_hits'] == 0
    b = openai_llm(server, db)  # a new LLM (new process, say) on the same SQLite file
    assert b.generate(chats, max_new_tokens=5) == first
    np.testing.assert_array_equal(b.score(chats[:2], ['yes', 'no']), a.score(chats[:2], ['yes', 'no']))
    assert len(server.requests) == n, 'a cached answer must not reach the backend'
    assert b.stats['calls'] == 0 and b.stats['cache_hits'] == 5 and b.stats['prompt_tokens'] == 0
    assert len(LLMCache(db)) == 5


def test_cache_keys_separate_decoding_params_model_and_op(tmp_path):
    be = ScriptedBackend(generate_fn=lambda c: 'x ' + last_user(c), score_fn=lambda c, ch: [0.0]*len(ch))
    db = tmp_path/'c.sqlite'
    llm = LLM(LLMConfig('model-a'), db, backend=be)
    c = [chat('p')]
    llm.generate(c, max_new_tokens=8)
    for kw in (dict(max_new_tokens=9), dict(max_new_tokens=8, temperature=0.7), dict(max_new_tokens=8, seed=1)):
        llm.generate(c, **kw)
    assert be.n_prompts('generate') == 4 and llm.stats['cache_hits'] == 0
    llm.generate(c, max_new_tokens=8, temperature=0.7)
    assert be.n_prompts('generate') == 4 and llm.stats['cache_hits'] == 1
    llm.score(c, ['yes', 'no']); llm.score(c, ['no', 'yes'])  # the choices (and their order) are part of the key
    assert be.n_prompts('score') == 2
    other = LLM(LLMConfig('model-b'), db, backend=be)  # another model never reads model-a's answers
    other.generate(c, max_new_tokens=8)
    assert be.n_prompts('generate') == 5 and other.stats['cache_hits'] == 0


def test_cache_computes_duplicate_prompts_once():
    be = ScriptedBackend(generate_fn=lambda c: last_user(c).upper())
    llm = LLM(LLMConfig('m'), None, backend=be)
    out = llm.generate([chat('a'), chat('b'), chat('a'), chat('a')])
    assert out == ['A', 'B', 'A', 'A'] and be.n_prompts() == 2 and llm.stats['calls'] == 2


def test_cache_keys_separate_openai_servers(tmp_path):
    """Two servers behind the same model name (a vLLM and a llama.cpp, say) never share answers."""
    db = tmp_path/'c.sqlite'
    with FakeOpenAI() as a, FakeOpenAI() as b:
        b.default = lambda path, req: (200, {'choices': [{'message': {'content': 'from b'}}]})
        assert openai_llm(a, db).generate([chat('q')]) == ['echo: q']
        assert openai_llm(b, db).generate([chat('q')]) == ['from b']
        assert openai_llm(a, db).generate([chat('q')]) == ['echo: q'] and len(a.requests) == 1


@pytest.mark.parametrize('bad', ['', '  \n ', None, 3])
def test_cache_never_stores_empty_or_non_text_answers(tmp_path, bad):
    """An empty answer (a server that failed quietly, a model that stopped at once) is returned but not cached: the
    next call asks again. One stored by an older version is not served either."""
    answers = [bad, 'a real answer']
    be = ScriptedBackend(generate_fn=lambda c: answers.pop(0))
    db = tmp_path/'c.sqlite'
    llm = LLM(LLMConfig('m'), db, backend=be)
    assert llm.generate([chat('q')]) == [bad] and len(LLMCache(db)) == 0 and llm.stats['empty_answers'] == 1
    assert llm.generate([chat('q')]) == ['a real answer'] and be.n_prompts() == 2
    assert LLM(LLMConfig('m'), db, backend=be).generate([chat('q')]) == ['a real answer'] and be.n_prompts() == 2
    key = LLMCache.key(llm.fingerprint, 'generate', chat('old'), dict(max_new_tokens=64, temperature=0.0, seed=0))
    LLMCache(db).put_many({key: bad})  # written before empty answers were refused
    answers.append('fresh')
    assert llm.generate([chat('old')]) == ['fresh'] and be.n_prompts() == 3


def test_cache_locked_by_another_writer_keeps_the_answers(tmp_path):
    """Another process holding the SQLite file's write lock: the call waits (busy timeout), retries, then returns its
    answers with a warning and counts them as not cached; nothing is lost, nothing crashes."""
    db = tmp_path/'c.sqlite'
    be = ScriptedBackend(generate_fn=lambda c: 'x ' + last_user(c))
    llm = LLM(LLMConfig('m'), LLMCache(db, busy_timeout_s=0.05), backend=be)
    other = sqlite3.connect(db, isolation_level=None); other.execute('BEGIN EXCLUSIVE')
    with pytest.warns(UserWarning) as w:
        assert llm.generate([chat('a'), chat('b')]) == ['x a', 'x b']
    msgs = [str(m.message) for m in w]
    assert any('c.sqlite: could not read' in m for m in msgs) and any('c.sqlite: 2 answers not cached' in m for m in msgs)
    assert llm.stats['not_cached'] == 2
    with pytest.raises(sqlite3.OperationalError, match=r'c\.sqlite: database is locked'): LLMCache(db, busy_timeout_s=0.05)
    other.execute('ROLLBACK')
    assert llm.generate([chat('a'), chat('b')]) == ['x a', 'x b'] and len(LLMCache(db)) == 2


def test_cache_waits_for_a_short_write_lock(tmp_path):
    db = tmp_path/'c.sqlite'
    LLMCache(db)
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False); other.execute('BEGIN IMMEDIATE')
    threading.Timer(0.3, lambda: other.execute('ROLLBACK')).start()
    llm = LLM(LLMConfig('m'), LLMCache(db, busy_timeout_s=5.0), backend=ScriptedBackend(generate_fn=lambda c: 'y'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert llm.generate([chat('a')]) == ['y']
    assert llm.stats['not_cached'] == 0 and len(LLMCache(db)) == 1


def test_corrupt_cache_file_is_named_with_what_to_do(tmp_path):
    db = tmp_path/'llm.sqlite'
    db.write_bytes(b'not a database at all \x00\xff' * 200)
    with pytest.raises(ValueError, match=r'llm\.sqlite.*not an SQLite.*delete it'):
        LLM(LLMConfig('m'), db, backend=ScriptedBackend(generate_fn=lambda c: 'x'))


def test_model_fingerprint_follows_the_weights(tmp_path):
    d = tmp_path/'model'; d.mkdir()
    (d/'config.json').write_text('{"a": 1}'); (d/'model.safetensors').write_bytes(b'0'*10)
    f1 = tl.model_fingerprint(LLMConfig(str(d)))
    (d/'model.safetensors').write_bytes(b'0'*11)
    assert tl.model_fingerprint(LLMConfig(str(d))) != f1
    assert tl.model_fingerprint(LLMConfig('m', 'openai', base_url='http://h:1/v1/')) == 'openai:m@http://h:1/v1'


@pytest.mark.parametrize('offline', ['1', '0'])
def test_prepared_model_folder_is_the_same_bytes_online_or_offline(tiny_llama, tmp_path, offline):
    """prepare_model's folder (a dep of every LLM stage) does not record the hub mode it ran under: the tokenizer
    writes `local_files_only` following HF_HUB_OFFLINE, which a bare `dvc repro` outside `make` leaves unset."""
    import os, subprocess, sys
    from conftest import ROOT
    env = {**os.environ, 'HF_HUB_OFFLINE': offline, 'TRANSFORMERS_OFFLINE': offline}
    code = f"from teduo.llm import prepare_hf_model; prepare_hf_model({str(tiny_llama)!r}, {str(tmp_path/'m')!r})"
    subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, check=True, capture_output=True)
    c = json.loads((tmp_path/'m'/'tokenizer_config.json').read_text())
    assert c.get('local_files_only', True) is True, c


# ---------------------------------------------------------------- strict parsing

def _json_parser(t): return parse_json_answer(t, {'type': 'object', 'required': ['a'], 'properties': {'a': {'type': 'integer'}}})


def test_ask_retries_with_feedback_then_gives_unparseable():
    be = ScriptedBackend(generate_fn=lambda c: 'I refuse to answer in JSON')
    llm = LLM(LLMConfig('m'), None, backend=be)
    out = llm.ask([chat('give json')], _json_parser, retries=2, max_new_tokens=5)
    assert len(be.calls) == 3, 'one ask plus exactly `retries` re-asks'
    assert isinstance(out[0], Unparseable) and not out[0] and out[0] != {} and out[0] is not None
    assert out[0].text == 'I refuse to answer in JSON' and 'no JSON object' in out[0].error
    assert llm.stats['unparseable'] == 1 and llm.stats['retries'] == 2
    retry = be.calls[1][1][0]  # the re-ask shows the model its answer and the error
    assert retry[:1] == chat('give json') and retry[1] == {'role': 'assistant', 'content': 'I refuse to answer in JSON'}
    assert retry[2]['role'] == 'user' and 'no JSON object' in retry[2]['content'] and len(retry) == 3
    assert len(be.calls[2][1][0]) == 5 and be.calls[2][1][0][:3] == retry  # the second re-ask extends the first


def test_ask_keeps_good_answers_and_recovers_on_retry():
    def gen(c):
        if last_user(c) == 'good': return '{"a": 1}'
        return '{"a": 2}' if len(c) > 1 else '{"a": "two"}'  # wrong type first, right after feedback
    be = ScriptedBackend(generate_fn=gen)
    llm = LLM(LLMConfig('m'), None, backend=be)
    out = llm.ask([chat('good'), chat('bad first')], _json_parser, retries=1, feedback='Fix it: {error}')
    assert out == [{'a': 1}, {'a': 2}]
    assert be.n_prompts() == 3 and llm.stats['retries'] == 1 and llm.stats['unparseable'] == 0
    assert be.calls[1][1][0][-1]['content'].startswith('Fix it: JSON does not match the schema')


def test_ask_does_not_swallow_parser_bugs():
    llm = LLM(LLMConfig('m'), None, backend=ScriptedBackend(generate_fn=lambda c: 'x'))
    with pytest.raises(ZeroDivisionError): llm.ask([chat('q')], lambda t: 1/0)


SCHEMA = {'type': 'object', 'additionalProperties': False, 'required': ['color'],
          'properties': {'color': {'enum': ['red', 'blue']}}}


def test_parse_json_answer_fenced_bare_and_surrounded():
    assert parse_json_answer('```json\n{"color": "red"}\n```', SCHEMA) == {'color': 'red'}
    assert parse_json_answer('{"color": "blue"}', SCHEMA) == {'color': 'blue'}
    assert parse_json_answer('Sure! Here it is: {"color": "red"} Hope this helps {"color": 1}', SCHEMA) == {'color': 'red'}


@pytest.mark.parametrize('text,msg', [
    ('no object here', 'no JSON object'),
    ('{"color": "red",}', 'invalid JSON'),
    ("{'color': 'red'}", 'invalid JSON'),  # a Python literal is not JSON
    ('{"color": "green"}', 'does not match the schema'),
    ('{"color": "red", "size": 2}', 'does not match the schema'),
    ('{}', 'does not match the schema'),
    ('```json\n{"color": \n```', 'invalid JSON'),
])
def test_parse_json_answer_refuses(text, msg):
    with pytest.raises(ParseError, match=msg): parse_json_answer(text, SCHEMA)


def test_parse_json_answer_integers_are_json_integers():
    """JSON Schema counts 3.0 as an integer; an answer used as an index must not (it crashed the abstract stage)."""
    assert _json_parser('{"a": 3}') == {'a': 3}
    for bad in ('{"a": 3.0}', '{"a": true}'):
        with pytest.raises(ParseError, match="not of type 'integer'"): _json_parser(bad)


def test_parse_choice():
    assert parse_choice('Yes', ['yes', 'no']) == 'yes'
    assert parse_choice('no.', ['yes', 'no']) == 'no'
    assert parse_choice('Is it yes or no? The key is held, so yes... Answer: No', ['yes', 'no']) == 'no'
    assert parse_choice('Answer: yes. answer: NO', ['yes', 'no']) == 'no'  # the last marker counts
    for bad in ('yes or no', 'maybe', 'yesterday, nothing', ''):
        with pytest.raises(ParseError, match='expected exactly one'): parse_choice(bad, ['yes', 'no'])


# ---------------------------------------------------------------- transformers backend on a tiny random llama

SYSTEM = 'You are a careful judge of grid worlds. Answer briefly. ' * 4  # a shared prefix longer than 32 tokens
QUESTIONS = ['Is the door open?', 'Where is the red ball?', 'x', 'Pick up the key, then go to the tile (3,1), quickly.',
             'Agent at (1,1) facing east. Is a ball in front?', 'Go.', 'Describe the room in a few words please.', '2+2?']


@pytest.fixture(scope='module')
def tiny(tiny_llama):
    "(tokenizer, model) of the tiny llama, as the backend loads them."
    return tl.load_hf(str(tiny_llama), 'float32')


def tiny_llm(tiny_llama, **kw):
    return LLM(LLMConfig(model=str(tiny_llama), dtype='float32', **kw))


def render(tok, c):
    "The prompt text: a generation prompt, or (final assistant message) that message continued."
    cont = c[-1]['role'] == 'assistant'
    return tok.apply_chat_template(c, tokenize=False, add_generation_prompt=not cont, continue_final_message=cont)


def _ref_ids(tok, c, options):
    "Shared prompt tokens and each option's continuation tokens, tokenizing prompt + option together."
    t = render(tok, c)
    p = tok(t, add_special_tokens=False)['input_ids']
    fulls = [tok(t + o, add_special_tokens=False)['input_ids'] for o in options]
    n = min(next((j for j, (a, b) in enumerate(zip(p, f)) if a != b), min(len(p), len(f))) for f in fulls)
    n = min(n, min(map(len, fulls)) - 1)
    return p[:n], [f[n:] for f in fulls]


def _logprobs(lm, ids, last=1):
    "(last, V) log-probs of the tokens after each of the last `last` positions of `ids`."
    import torch
    with torch.no_grad(): return torch.log_softmax(lm(input_ids=torch.tensor([ids]), logits_to_keep=last).logits[0].double(), -1)


def brute_force_score(tok, lm, c, choices):
    "log p(choice | prompt) by one plain forward over the whole sequence (no padding, no cache, no prefix)."
    p, conts = _ref_ids(tok, c, choices)
    out = []
    for cont in conts:
        lp = _logprobs(lm, p + cont, len(cont) + 1)  # row i predicts the token at position len(p) + i
        out.append(float(sum(lp[i, t] for i, t in enumerate(cont))))
    return out


def greedy_choice(tok, lm, c, options):
    "Walk the options' token trie, taking the most likely allowed token where they branch (no cache)."
    p, conts = _ref_ids(tok, c, options)
    cand, seq, j = list(range(len(options))), list(p), 0
    while len(cand) > 1:
        toks = sorted({conts[k][j] for k in cand})
        t = toks[0] if len(toks) == 1 else toks[int(np.argmax(_logprobs(lm, seq)[-1, toks].numpy()))]
        cand = [k for k in cand if conts[k][j] == t]; seq.append(t); j += 1
    return cand[0]


def greedy_decode(tok, lm, c, max_new_tokens):
    "Token-by-token greedy decoding without a KV cache."
    ids = tok(render(tok, c), add_special_tokens=False)['input_ids']; new = []
    for _ in range(max_new_tokens):
        nxt = int(_logprobs(lm, ids + new)[-1].argmax())
        new.append(nxt)
        if nxt == tok.eos_token_id: break
    return tok.decode([x for x in new if x != tok.eos_token_id], skip_special_tokens=True)


CHOICES = ['Yes', 'No', 'Not sure at all', 'Maybe later, perhaps']  # single- and multi-token, different lengths


def test_score_equals_brute_force_log_prob(tiny_llama, tiny):
    """Multi-token choices go through the KV-cache reuse path; the shared system prompt through the prefix cache."""
    tok, lm = tiny
    chats = [chat(q, SYSTEM) for q in QUESTIONS] + [chat('no system prompt here')]
    chats.append(chat('Goal: go to the red ball') + [{'role': 'assistant', 'content': '{"goal_objects": ['}])  # continued answer
    choices = CHOICES + ['{"color": ', ']']
    got = tiny_llm(tiny_llama, batch_size=4).score(chats, choices)
    ref = np.array([brute_force_score(tok, lm, c, choices) for c in chats])
    assert np.isfinite(ref).all() and ref.std() > 0.1
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    one = tiny_llm(tiny_llama, batch_size=3).score(chats[:5], ['Yes', 'No'])  # single-token choices: one forward
    np.testing.assert_allclose(one, ref[:5, :2], atol=1e-4, rtol=0)


def test_shared_prefix_scoring_equals_plain_scoring(tiny_llama, monkeypatch):
    chats = [chat(q, SYSTEM) for q in QUESTIONS]
    be = TransformersBackend(LLMConfig(str(tiny_llama), dtype='float32', batch_size=3))
    ids = be.encode_chats(chats)
    assert be._prefix(ids) > 32, 'the test must exercise the shared-prefix cache'
    with_prefix, _ = be.score(chats, CHOICES)
    monkeypatch.setattr(TransformersBackend, '_prefix_kv', lambda self, ids: (None, 0))
    without, _ = be.score(chats, CHOICES)
    np.testing.assert_allclose(with_prefix, without, atol=1e-4, rtol=0)
    gen_plain = be.generate(chats, 6, 0.0, 0)
    monkeypatch.undo()
    assert be.generate(chats, 6, 0.0, 0) == gen_plain


def test_choose_equals_greedy_token_by_token_choice(tiny_llama, tiny):
    tok, lm = tiny
    options = ['Maybe yes', 'Maybe no', 'Surely so', 'Surely not at all', 'Never']
    chats = [chat(q, SYSTEM) for q in QUESTIONS] + [chat(q) for q in QUESTIONS[:4]]
    got = tiny_llm(tiny_llama, batch_size=5).choose(chats, options)
    ref = [greedy_choice(tok, lm, c, options) for c in chats]
    assert got == ref
    assert len(set(ref)) >= 2, 'a fixture where every prompt picks the same option could not catch a wrong choice'
    with pytest.raises(ValueError, match='nest'):
        tiny_llm(tiny_llama).choose(chats[:1], ['Maybe', 'Maybe no'])


def test_generate_batched_equals_unbatched_and_uncached_greedy(tiny_llama, tiny):
    tok, lm = tiny
    chats = [chat(q, SYSTEM) for q in QUESTIONS]  # 8 prompts of different lengths
    batched = tiny_llm(tiny_llama, batch_size=8)
    one = tiny_llm(tiny_llama, batch_size=1)
    a, b = batched.generate(chats, max_new_tokens=10), one.generate(chats, max_new_tokens=10)
    assert a == b and len(set(a)) > 1
    assert a[:3] == [greedy_decode(tok, lm, c, 10) for c in chats[:3]]
    assert batched.stats['completion_tokens'] == one.stats['completion_tokens'] > 0
    mixed = [chat(q) for q in QUESTIONS]  # no shared prefix worth caching
    assert tiny_llm(tiny_llama, batch_size=8).generate(mixed, 6) == tiny_llm(tiny_llama, batch_size=1).generate(mixed, 6)


def test_reserved_kv_cache_decodes_in_place_with_the_same_numbers(tiny):
    """reserve_kv: decoding writes into pre-allocated room (no copy of the cache per step), logits unchanged; a step
    past the room falls back to concatenation."""
    import torch
    from teduo.llm import reserve_kv
    tok, lm = tiny
    x = torch.tensor([tok(render(tok, chat(q, SYSTEM)), add_special_tokens=False)['input_ids'][:20] for q in QUESTIONS[:3]])
    steps = torch.tensor([[5], [7], [9]])
    with torch.no_grad():
        plain, res = lm(input_ids=x, use_cache=True).past_key_values, reserve_kv(lm(input_ids=x, use_cache=True).past_key_values, 2)
        ptr = res.layers[0].keys.data_ptr()
        for t in range(3):  # the third step has no room left
            pos = torch.full((3, 1), 20 + t)
            a = lm(input_ids=steps + t, position_ids=pos, past_key_values=plain, use_cache=True).logits
            b = lm(input_ids=steps + t, position_ids=pos, past_key_values=res, use_cache=True).logits
            assert torch.equal(a, b)
            assert res.get_seq_length() == plain.get_seq_length() == 21 + t
            assert (res.layers[0].keys.data_ptr() == ptr) == (t < 2)  # in place while there is room, then a new tensor
    assert all(torch.equal(p.keys, r.keys) and torch.equal(p.values, r.values) for p, r in zip(plain.layers, res.layers))


def test_per_chat_seeds_make_a_sampled_answer_independent_of_its_batch(tiny_llama, tmp_path):
    "Batched re-asks: a chat's sampled answer and cache entry depend on its own seed, not on its batch or on cache hits."
    chat = [{'role': 'user', 'content': 'Say something.'}]
    kw = dict(max_new_tokens=8, temperature=1.0)
    alone = tiny_llm(tiny_llama).generate([chat], seed=[5], **kw)[0]
    llm = tiny_llm(tiny_llama, batch_size=4)
    batch = llm.generate([chat, chat, chat], seed=[7, 5, 9], **kw)
    assert batch[1] == alone and len(set(batch)) > 1, 'row 2 samples as alone; other seeds differ'
    assert tiny_llm(tiny_llama).generate([chat], seed=5, **kw)[0] == alone, 'a one-chat call with the int seed draws the same'
    cached = LLM(LLMConfig(model=str(tiny_llama), dtype='float32'), tmp_path/'c.sqlite')
    assert cached.generate([chat], seed=[9], **kw) == [batch[2]]
    assert cached.generate([chat, chat], seed=[9, 7], **kw) == [batch[2], batch[0]] and cached.stats['cache_hits'] == 1
    with pytest.raises(ValueError, match='2 seeds for 1 chats'): llm.generate([chat], seed=[1, 2], **kw)


def test_action_list_stop_rule_keeps_every_parse():
    "Ending an answer once `action_list_settled` holds never changes what `parse_action_prefix` reads from it."
    from teduo.llm import action_list_settled, settle
    from teduo.policy_prompt import parse_action_prefix
    def parse(t):
        try: return parse_action_prefix(t)
        except ValueError: return None
    texts = ['[2, 2, 1, 3]', ' [2, 1] and then more [3]', '[2, 1', 'Sure! [2, 1]', '', '   ', '[]', '[2, x, 1]',
             '\n[6]\n\nState:', '[2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2]', 'I think [1]', '[9, 1]']
    for t in texts:
        s = settle(t, action_list_settled)
        assert t.startswith(s) and parse(s) == parse(t), t
    assert settle('Sure! [2, 1]', action_list_settled) == 'S' and settle(' [2, 1] more', action_list_settled) == ' [2, 1]'
    assert not action_list_settled('  [2, 1') and not action_list_settled('')


def test_generate_with_a_stop_rule_ends_rows_early_and_keeps_the_rest(tiny_llama, tiny):
    """A stop rule ends each row at the first token where it holds (the rest of a greedy answer is what decoding
    without the rule gives), ended rows leave the batch without changing the others, and the rule is in the cache key."""
    import torch
    from teduo.llm import STOPS
    tok, lm = tiny
    chats = [chat(q, SYSTEM) for q in QUESTIONS]
    rule = lambda t: len(t.strip()) >= 6  # rows reach it after different numbers of tokens
    def ref(c, n=12):
        ids = tok(render(tok, c), add_special_tokens=False)['input_ids']; new = []
        for _ in range(n):
            nxt = int(_logprobs(lm, ids + new)[-1].argmax()); new.append(nxt)
            if nxt == tok.eos_token_id or rule(tok.decode(new, skip_special_tokens=True)): break
        return tok.decode([x for x in new if x != tok.eos_token_id], skip_special_tokens=True), len(new)
    be8 = TransformersBackend(LLMConfig(str(tiny_llama), dtype='float32', batch_size=8))
    be1 = TransformersBackend(LLMConfig(str(tiny_llama), dtype='float32', batch_size=1))
    got8, got1 = be8.generate(chats, 12, 0.0, 0, stop=rule), be1.generate(chats, 12, 0.0, 0, stop=rule)
    want = [ref(c) for c in chats]
    assert [(t, n) for t, _, n in got8] == [(t, n) for t, _, n in got1] == want
    assert len({n for _, n in want}) > 1, 'rows end at different steps: the batch shrinks'
    full = be8.generate(chats, 12, 0.0, 0)
    assert all(f.startswith(t) for (f, _, _), (t, _) in zip(full, want))
    llm = tiny_llm(tiny_llama, batch_size=8)
    a, b = llm.generate(chats[:2], 12), llm.generate(chats[:2], 12, stop='action_list')
    assert llm.stats['cache_hits'] == 0 and 'action_list' in STOPS  # a stopped answer is another cache entry
    with pytest.raises(ValueError, match="stop 'comma': expected None or action_list"): llm.generate(chats[:1], 4, stop='comma')


def test_an_ended_row_keeps_its_answer_while_the_batch_decodes_on(tiny_llama, tiny):
    "Without a stop rule, a row that ended (end-of-turn) stays in the batch, and nothing after its end is kept."
    tok, lm = tiny
    chats = [chat(q, SYSTEM) for q in QUESTIONS]
    be = TransformersBackend(LLMConfig(str(tiny_llama), dtype='float32', batch_size=8))
    ids = tok(render(tok, chats[0]), add_special_tokens=False)['input_ids']; first = []
    for _ in range(3): first.append(int(_logprobs(lm, ids + first)[-1].argmax()))
    be.tok.eos_token = be.tok.convert_ids_to_tokens(first[2])  # chat 0 ends at its third token; others may not
    got = be.generate(chats, 10, 0.0, 0)
    assert got[0][2] == 3 and got[0][0] == tok.decode(first[:2], skip_special_tokens=True)
    one = TransformersBackend(LLMConfig(str(tiny_llama), dtype='float32', batch_size=1)); one.tok.eos_token = be.tok.eos_token
    assert got == one.generate(chats, 10, 0.0, 0) and max(n for _, _, n in got) > 3
