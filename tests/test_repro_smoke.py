"""The whole pipeline, every DVC stage chain (BabyAI, WebShop, the figures and the README block), at tiny params.

A copy of the checkout (tracked files and the data folder) runs `dvc repro` and then the README update exactly as
`make repro` does, with a tiny random llama standing in for SmolLM2 (prepare_model converts it like the real one)
and params cut to seconds per stage. A random model answers badly on purpose: it is the weak model every stage must
survive (unparseable answers, goals nobody labels, an empty SFT filter), reporting what happened instead of crashing.
About 3-6 minutes on 2 cores; the stages' own unit tests live beside them."""
import json, os, shutil, subprocess, sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

# Tiny values for the default params (a dotted path -> value); everything else stays as committed.
TINY = {
    'base.llm.abstraction.batch_size': 4, 'base.llm.labeling.batch_size': 4, 'base.llm.policy.batch_size': 4,
    'babyai.num_dists': 3, 'babyai.train_layouts.count': 12, 'babyai.test_layouts.count': 4,
    'goals.n_train': 3, 'goals.n_test': 2,
    'collect.n_episodes': 40, 'collect.n_workers': 1, 'collect.step_cap': 16,
    'abstract.max_new_tokens': 16,
    'label.states_per_goal': 8, 'label.hidden': 8,
    'offline_rl.max_sweeps': 200, 'offline_rl.dqn.steps': 20, 'offline_rl.bc.epochs': 2,
    'sft_data.replay_per_goal': 2, 'sft_data.max_examples': 12, 'sft_data.max_plan_len': 16, 'sft_data.heldout_examples': 6,
    'finetune.max_steps': 2, 'finetune.batch_size': 4, 'finetune.max_length': 256, 'finetune.eval_steps': 1,
    'finetune.logging_steps': 1,
    'baselines.il.epochs': 2, 'baselines.gcbc.epochs': 1, 'baselines.gcbc.max_examples': 500,
    'evaluate.goals_per_quadrant': 1, 'evaluate.episodes_per_goal': 1, 'evaluate.max_steps': 6, 'evaluate.max_new_tokens': 8,
    'webshop.train_goals.count': 4, 'webshop.test_goals.count': 2,
    'webshop_collect.per_goal': 1, 'webshop_collect.step_cap': 4, 'webshop_collect.max_new_tokens': 6,
    'webshop_sft.max_examples': 8,
    'webshop_finetune.train.max_steps': 2, 'webshop_finetune.train.batch_size': 2, 'webshop_finetune.train.max_length': 256,
    'webshop_evaluate.episodes.train': 2, 'webshop_evaluate.episodes.test': 2, 'webshop_evaluate.max_steps': 4,
    'webshop_evaluate.max_new_tokens.plain': 8, 'webshop_evaluate.max_new_tokens.react': 8,
}


def tiny_params(params:dict, model:str)->dict:
    "The committed params with `TINY` applied and `model` as prepare_model's source (a KeyError names a stale path)."
    p = json.loads(json.dumps(params))
    for dotted, v in {**TINY, 'prepare_model.source': model}.items():
        *parents, key = dotted.split('.')
        d = p
        for k in parents: d = d[k]
        if key not in d: raise KeyError(f"TINY: {dotted} is not in params.yaml")
        d[key] = v
    return p


def copy_checkout(dest:Path)->Path:
    "The tracked files and the data folder, in a new git repository at `dest` (the way a fresh clone looks)."
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split('\0')
    for f in filter(None, files):
        if (ROOT/f).is_file(): (dest/f).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(ROOT/f, dest/f)
    shutil.copytree(ROOT/'data', dest/'data')
    git = lambda *a: subprocess.run(['git', *a], cwd=dest, check=True, capture_output=True)
    git('init', '-q'); git('add', '-A'); git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'copy')
    return dest


@pytest.fixture(scope='module')
def smoke_run(tiny_llama, tmp_path_factory):
    "Run `dvc repro` and the README update in a copy at tiny params; (copy, log)."
    if not (ROOT/'data'/'babyai').exists(): pytest.skip('data/ is absent: run `make data` (dvc pull) first')
    work = copy_checkout(tmp_path_factory.mktemp('smoke')/'teduo')
    params = yaml.safe_load((work/'params.yaml').read_text())
    (work/'params.yaml').write_text(yaml.safe_dump(tiny_params(params, str(tiny_llama)), sort_keys=False))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, 'PYTHONPATH': str(work), 'PATH': f"{bin_dir}{os.pathsep}{os.environ['PATH']}", 'OMP_NUM_THREADS': '1'}
    log = []
    for cmd in (['dvc', 'repro'], [sys.executable, '-m', 'teduo.figures', '--readme', 'README.md'], ['dvc', 'status']):
        r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1500)
        log.append(f"$ {' '.join(cmd)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
        assert r.returncode == 0, log[-1]
    return work, '\n'.join(log)


def test_every_stage_ran_and_wrote_its_metrics(smoke_run):
    work, log = smoke_run
    stages = yaml.safe_load((work/'dvc.yaml').read_text())['stages']
    lock = yaml.safe_load((work/'dvc.lock').read_text())['stages']
    assert set(lock) == set(stages), f"stages without a lock entry: {sorted(set(stages) - set(lock))}"
    for name, st in stages.items():
        for m in st.get('metrics', []):
            path = next(iter(m)) if isinstance(m, dict) else m
            path = path.replace('${', '').replace('}', '')
            if '/' not in path:  # a ${section.key} reference
                v = yaml.safe_load((work/'params.yaml').read_text())
                for k in path.split('.'): v = v[k]  # e.g. finetune.oracle_control.metrics
                path = v
            assert json.loads((work/path).read_text()), f"{name}: empty metrics {path}"
    assert 'Data and pipelines are up to date' in log.split('$ dvc status')[-1], log


def test_figures_tables_and_readme_block_are_made(smoke_run):
    work, _ = smoke_run
    for f in ('reports/tables/table1.md', 'reports/figures/table1.png', 'reports/tables/webshop.md', 'reports/figures/webshop.png'):
        assert (work/f).stat().st_size > 0, f
    readme = (work/'README.md').read_text()
    assert readme != (ROOT/'README.md').read_text(), "the README block was not rewritten from the smoke run's tables"
    t1 = (work/'reports/tables/table1.md').read_text()
    for agent in ('random', 'TEDUO'):
        assert agent.lower() in t1.lower(), t1


def test_teduo_is_reported_even_without_training_data(smoke_run):
    "Trained or not (a random model's plans rarely pass), TEDUO has a row in both tables, and the metrics say which."
    work, _ = smoke_run
    ev = json.loads((work/'metrics/evaluate.json').read_text())
    assert 'teduo' in ev['agents'] or 'teduo' in ev['not_run'], ev.keys()
    ft = json.loads((work/'metrics/finetune.json').read_text())
    assert ft['trained'] == ('teduo' in ev['agents']), (ft, ev.get('not_run'))
    fo = json.loads((work/'metrics/finetune_oracle.json').read_text())  # the oracle-step-1 control: the same, with its own adapter
    assert fo['trained'] == ('teduo_oracle' in ev['agents']), (fo, ev.get('not_run'))
    if fo['trained']: assert fo['next_action']['n'] == json.loads((work/'metrics/sft_data_oracle.json').read_text())['examples_heldout']
    ws = json.loads((work/'metrics/webshop_evaluate.json').read_text())
    for pol, ft in (('teduo', 'webshop_finetune'), ('teduo_oracle', 'webshop_finetune_oracle')):  # WebShop: the same
        assert (pol in ws['policies']) != (pol in ws['not_run']), (pol, ws['not_run'])
        assert json.loads((work/f'metrics/{ft}.json').read_text())['trained'] == (pol in ws['policies'])
    demo = ws['train_split']  # the train split: training goals with a demonstration, counted
    assert demo['rule'] == 'demonstrated' and demo['goals'] <= demo['demonstrated_goals'], demo
