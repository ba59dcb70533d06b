"""The committed numbers are the committed run's: every git-tracked metrics file has the md5 dvc.lock records for it,
and the code, notebooks and params that dvc.lock records are the ones in the checkout (a stale lock would mean the
metrics came from other code). Timing records (metrics/timing*) are the only outputs allowed to differ between runs."""
import hashlib, subprocess

import pytest
import yaml

from conftest import ROOT

LOCK = yaml.safe_load((ROOT/'dvc.lock').read_text())['stages']
PARAMS = yaml.safe_load((ROOT/'params.yaml').read_text())
TRACKED = set(subprocess.run(['git', 'ls-files'], cwd=ROOT, check=True, capture_output=True, text=True).stdout.split())
md5 = lambda p: hashlib.md5((ROOT/p).read_bytes()).hexdigest()


def same(a, b)->bool:
    "Equal params, reading numbers the way DVC's YAML does (PyYAML reads the lock's `1e-06` as a string)."
    if isinstance(a, dict) and isinstance(b, dict): return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list): return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)) and not isinstance(a, bool) and not isinstance(b, bool):
        try: return float(a) == float(b)
        except ValueError: pass
    return a == b


def lookup(dotted:str):
    v = PARAMS
    for k in dotted.split('.'): v = v[k]
    return v


@pytest.mark.parametrize('stage', sorted(LOCK))
def test_tracked_metrics_match_the_lock(stage):
    for out in LOCK[stage].get('outs', []):
        p = out['path']
        if p in TRACKED and not p.startswith('metrics/timing'):
            assert md5(p) == out['md5'], f"{p}: its bytes are not the ones dvc.lock records for stage {stage} (rerun `make repro` and commit)"


@pytest.mark.parametrize('stage', sorted(LOCK))
def test_lock_is_the_checkout_code_and_params(stage):
    for dep in LOCK[stage].get('deps', []):
        p = dep['path']
        if p in TRACKED:
            assert md5(p) == dep['md5'], f"{p} changed since stage {stage} ran (dvc.lock is stale: rerun `make repro` and commit)"
    for dotted, v in LOCK[stage].get('params', {}).get('params.yaml', {}).items():
        assert same(lookup(dotted), v), f"params.yaml:{dotted} differs from the value stage {stage} ran with (dvc.lock is stale)"


def test_lock_covers_every_stage():
    stages = yaml.safe_load((ROOT/'dvc.yaml').read_text())['stages']
    assert set(LOCK) == set(stages)
    for name, st in stages.items():
        assert LOCK[name]['cmd'] == st['cmd'], f"stage {name}: dvc.lock ran another command"


def test_compare_counts_only_timing_records_as_differing_by_design():
    "`make compare` (tools/compare_run.py) may excuse wall times, never a result (a figure or a notebook's log included)."
    import importlib.util
    spec = importlib.util.spec_from_file_location('compare_run', ROOT/'tools'/'compare_run.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    for p in ('metrics/timing.json', 'metrics/timing/label.json', 'reports/timing.png'):
        assert m.by_design(p), p
    for p in ('metrics/evaluate.json', 'reports/tables', 'reports/figures', 'reports/webshop_episodes.csv', 'reports/label_audit.png',
              'outputs/babyai/labels', 'outputs/babyai/adapter', 'README.md'):
        assert not m.by_design(p), p
    assert m.main() == 0, 'the checkout is the committed run'
