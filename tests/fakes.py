"""Test doubles for the LLM layer: scripted backends (no model) and a local OpenAI-compatible HTTP server."""
import json, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


class ScriptedBackend:
    """A backend whose answers come from Python functions of the chat; it records every call.
    generate_fn(chat) -> text; score_fn(chat, choices) -> log-probs; choose_fn(chat, options) -> index."""
    def __init__(self, generate_fn=None, score_fn=None, choose_fn=None):
        self.generate_fn, self.score_fn, self.choose_fn = generate_fn, score_fn, choose_fn
        self.calls = []  # (op, chats)
    def generate(self, chats, max_new_tokens, temperature, seed, progress=False):
        self.calls.append(('generate', [list(c) for c in chats]))
        return [(self.generate_fn(c), 10, 3) for c in chats]
    def score(self, chats, choices, progress=False):
        self.calls.append(('score', [list(c) for c in chats]))
        return np.array([self.score_fn(c, choices) for c in chats], float).reshape(len(chats), len(choices)), [10]*len(chats)
    def choose(self, chats, options, progress=False):
        self.calls.append(('choose', [list(c) for c in chats]))
        return [int(self.choose_fn(c, options)) for c in chats], [10]*len(chats)
    def n_prompts(self, op=None): return sum(len(cs) for o, cs in self.calls if op is None or o == op)


# What the stand-in policy LLM (conftest `tiny_policy_llama`) is trained to answer, per goal.
POLICY_ANSWERS = {'go to the red ball': '[2, 2, 1]', 'pick up a key': '[1, 3]', 'open a door': '[0, 2, 5]',
                  'go to the tile (3,1)': '[2]'}


def last_user(chat)->str: return [m['content'] for m in chat if m['role'] == 'user'][-1]


class FakeOpenAI:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 (a free port), in a thread.
    `script` holds (status, payload) answers consumed first (payload: dict -> JSON, bytes -> raw body, a function ->
    called with the handler instead of answering, to send a broken or slow response); after that every request gets
    `default(body)`. `requests` records (path, headers, body) of every request."""
    def __init__(self):
        self.requests, self.script, self.lock = [], [], threading.Lock()
        self.top_logprobs = [{'token': 'Yes', 'logprob': -0.25}, {'token': ' no', 'logprob': -1.5},
                             {'token': 'NO', 'logprob': -3.0}, {'token': 'maybe', 'logprob': -4.0}]
        srv = self
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get('Content-Length', 0)))
                try: req = json.loads(body)
                except json.JSONDecodeError: req = None
                with srv.lock:
                    srv.requests.append((self.path, dict(self.headers), req))
                    status, payload = srv.script.pop(0) if srv.script else srv.default(self.path, req)
                if callable(payload): return payload(self)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status); self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data))); self.end_headers(); self.wfile.write(data)
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    def default(self, path, req):
        "Deterministic answers: the text echoes the last user message; usage counts words."
        if path != '/v1/chat/completions': return 404, {'error': f'no route {path}'}
        text = 'echo: ' + last_user(req['messages'])
        usage = {'prompt_tokens': sum(len(m['content'].split()) for m in req['messages']), 'completion_tokens': len(text.split())}
        choice = {'index': 0, 'message': {'role': 'assistant', 'content': text}, 'finish_reason': 'stop'}
        if req.get('logprobs'):
            choice['logprobs'] = {'content': [{'token': 'Yes', 'logprob': -0.25, 'top_logprobs': self.top_logprobs}]}
        return 200, {'id': 'x', 'object': 'chat.completion', 'model': req['model'], 'choices': [choice], 'usage': usage}
    def __enter__(self): self.thread.start(); return self
    def __exit__(self, *a): self.httpd.shutdown(); self.httpd.server_close()


def raw_reply(data:bytes):
    "A scripted payload that writes `data` as the whole reply (no status line of the server's own) and hangs up."
    def send(handler): handler.wfile.write(data); handler.close_connection = True
    return send


def trickle(status:int, payload:dict, seconds:float, pieces:int=30):
    "A scripted payload that sends a complete reply, its body in `pieces` spread over `seconds` (a slow server)."
    def send(handler):
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status); handler.send_header('Content-Length', str(len(data))); handler.end_headers()
            for i in range(pieces):
                handler.wfile.write(data[i*len(data)//pieces:(i + 1)*len(data)//pieces]); handler.wfile.flush()
                time.sleep(seconds / pieces)
        except OSError: pass  # the client hung up (its deadline passed)
    return send
