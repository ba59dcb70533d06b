"""The step notebooks keep the small outputs of their tiny examples (STYLE.md; `make outputs` refreshes them): a reader
on GitHub sees a grid, a state text, a labeled sample, a plan, a rollout strip without running anything."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NBS = sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
BABYAI_STEPS = ['01_babyai', '02_collect', '03_abstract', '04_label', '05_offline_rl', '06_sft_data', '07_finetune',
                '08_agent', '09_evaluate', '10_figures']
LOCAL = ('/tmp', '/home/', '/work/', str(ROOT))


def outputs(nb:Path)->list[list[dict]]:
    return [c.get('outputs', []) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']


def test_at_least_40_code_cells_keep_outputs():
    n = sum(bool(o) for nb in NBS for o in outputs(nb))
    assert n >= 40, f"{n} code cells keep outputs; run `make outputs`"


@pytest.mark.parametrize('name', BABYAI_STEPS)
def test_every_babyai_step_shows_a_picture(name):
    pics = sum('image/png' in o.get('data', {}) for os_ in outputs(ROOT/'nbs'/f'{name}.ipynb') for o in os_)
    assert pics >= 1, f"nbs/{name}.ipynb shows no picture; run `make outputs`"


@pytest.mark.parametrize('nb', NBS, ids=lambda p: p.name)
def test_kept_outputs_are_small_and_hold_nothing_of_one_machine(nb):
    for os_ in outputs(nb):
        for o in os_:
            assert o['output_type'] != 'error' and not (o['output_type'] == 'stream' and o.get('name') == 'stderr'), nb.name
            text = ''.join(o.get('text', '')) + ''.join(''.join(v) for k, v in o.get('data', {}).items() if k.startswith('text'))
            assert not any(p in text for p in LOCAL), f"{nb.name}: an output names a local path: {text[:120]!r}"
            assert len(text) <= 4_000 and len(o.get('data', {}).get('image/png', '')) <= 80_000, f"{nb.name}: an output over the size limits"
            assert o.get('execution_count') is None, f"{nb.name}: execution counts are committed (nbdev_clean)"
