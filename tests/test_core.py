"""Core plumbing: atomic directory outputs under failures and kills at every step of the swap, and count params."""
import os, shutil
from pathlib import Path

import numpy as np
import pytest

from teduo.core import atomic_path, check_positive

OLD = {'a.txt': 'old a', 'sub/b.txt': 'old b'}
NEW = {'a.txt': 'new a', 'c.txt': 'new c'}


def _tree(d:Path)->dict: return {p.relative_to(d).as_posix(): p.read_text() for p in sorted(d.rglob('*')) if p.is_file()}


def _write(dest:Path, files:dict, fail:bool=False):
    with atomic_path(dest) as tmp:
        for k, v in files.items(): (tmp/k).parent.mkdir(parents=True, exist_ok=True); (tmp/k).write_text(v)
        if fail: raise RuntimeError('the stage failed')


class Killed(BaseException): "Stands for a SIGKILL: raised by a filesystem call (and, after a kill, by every later one)."


def _faulty(m, fail_at:int, kill:bool)->list:
    """Make the `fail_at`-th rename/replace/rmtree raise `Killed` (an rmtree after deleting one file: killed mid-delete);
    with `kill`, every later one raises too (a dead process does nothing)."""
    calls = []
    def wrap(name, f):
        def g(*a, **k):
            calls.append(name)
            if len(calls) == fail_at and name == 'rmtree': next(p for p in Path(a[0]).rglob('*') if p.is_file()).unlink()
            if len(calls) == fail_at or (kill and len(calls) > fail_at): raise Killed(name)
            return f(*a, **k)
        return g
    for mod, name in ((os, 'rename'), (os, 'replace'), (shutil, 'rmtree')): m.setattr(mod, name, wrap(name, getattr(mod, name)))
    return calls


def test_atomic_path_replaces_a_directory_and_leaves_nothing_beside_it(tmp_path, monkeypatch):
    _write(tmp_path/'out', OLD)
    with monkeypatch.context() as m:
        calls = _faulty(m, 0, False)
        _write(tmp_path/'out', NEW)
    assert calls == ['rename', 'rename', 'rmtree'], 'old aside, new in, old deleted: the steps the next test breaks'
    assert _tree(tmp_path/'out') == NEW and [p.name for p in tmp_path.iterdir()] == ['out']
    with pytest.raises(RuntimeError): _write(tmp_path/'out', OLD, fail=True)
    assert _tree(tmp_path/'out') == NEW and [p.name for p in tmp_path.iterdir()] == ['out'], 'a failed write keeps the old one'


@pytest.mark.parametrize('kill', [False, True], ids=['error', 'kill'])
@pytest.mark.parametrize('fail_at', [1, 2, 3], ids=['move-old-aside', 'rename-new-in', 'delete-old'])
def test_atomic_path_directory_is_old_or_new_whatever_step_fails(tmp_path, monkeypatch, fail_at, kill):
    dest = tmp_path/'out'
    _write(dest, OLD)
    with monkeypatch.context() as m:
        calls = _faulty(m, fail_at, kill)
        with pytest.raises(Killed): _write(dest, NEW)
    left = [p for p in tmp_path.iterdir() if p.name != 'out']
    if dest.exists(): assert _tree(dest) in (OLD, NEW), 'never a half-deleted directory at the final path'
    else:  # killed between the two renames: the complete old one waits beside it
        assert kill and fail_at == 2 and [_tree(p) for p in left if '.old-' in p.name] == [OLD]
    if not kill: assert _tree(dest) == (NEW if fail_at == 3 else OLD), 'an error restores the old directory'
    with pytest.raises(RuntimeError): _write(dest, NEW, fail=True)  # the next write cleans up, even when it fails
    assert _tree(dest) in (OLD, NEW) and [p.name for p in tmp_path.iterdir()] == ['out']
    _write(dest, {'d.txt': 'newer'})
    assert _tree(dest) == {'d.txt': 'newer'} and [p.name for p in tmp_path.iterdir()] == ['out']


def test_atomic_path_cleans_only_its_own_leftovers(tmp_path):
    for name in ('.out.old-123', '.out.tmp-456'): (tmp_path/name).mkdir(); (tmp_path/name/'x').write_text('stale')
    for name in ('.outer.tmp-1', '.out.tmp-x', 'out.old-1'): (tmp_path/name).write_text('not ours')
    _write(tmp_path/'out', NEW)  # no `out`: the moved-aside one was restored first, then replaced
    assert _tree(tmp_path/'out') == NEW
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.out.tmp-x', '.outer.tmp-1', 'out', 'out.old-1']


def test_check_positive_names_the_param():
    assert check_positive(3, 'p') == 3 and check_positive(np.int64(2), 'p') == 2
    for bad in (0, -4, 1.5, True, None, '3'):
        with pytest.raises(ValueError, match=r"params.yaml:evaluate.max_steps: got .*, expected an integer >= 1"):
            check_positive(bad, 'params.yaml:evaluate.max_steps')


def test_the_kernel_pins_of_the_makefile_and_the_package_agree():
    "Every math-library pin the Makefile exports for the stages is also the package's default (and OpenBLAS is pinned)."
    import re, subprocess, sys
    from conftest import ROOT
    make = dict(re.findall(r'^export (MKL_CBWR|ATEN_CPU_CAPABILITY|ONEDNN_MAX_CPU_ISA|OPENBLAS_CORETYPE) \?= (\S+)$',
                           (ROOT/'Makefile').read_text(), re.M))
    assert set(make) == {'MKL_CBWR', 'ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'OPENBLAS_CORETYPE'}, make
    env = {k: v for k, v in __import__('os').environ.items() if k not in make}
    code = "import json, os, teduo; print(json.dumps({k: os.environ.get(k) for k in %r}))" % sorted(make)
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert __import__('json').loads(out) == make


def test_teduo_imported_first_pins_numpys_openblas_kernels():
    "With OPENBLAS_CORETYPE unset, importing teduo before numpy loads OpenBLAS with the pinned Haswell kernels."
    import os, subprocess, sys
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k != 'OPENBLAS_CORETYPE'}
    code = "import json, teduo, numpy; from teduo.core import blas_cores; print(json.dumps(blas_cores()))"
    out = subprocess.run([sys.executable, '-c', code], env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert __import__('json').loads(out) == ['Haswell']


def test_a_stage_refuses_openblas_kernels_other_than_the_pin(tmp_path, monkeypatch):
    "numpy loaded its kernels before the pin took effect (here: the pin now names others): a stage stops, a demo warns."
    from teduo.core import StageTimer, blas_cores
    assert blas_cores() and 'Prescott' not in blas_cores()
    monkeypatch.setenv('OPENBLAS_CORETYPE', 'Prescott')
    with pytest.raises(RuntimeError, match=r"OpenBLAS runs .* kernels, not the pinned 'Prescott'.*OPENBLAS_CORETYPE=Haswell"):
        StageTimer('label', tmp_path/'timing.json')
    assert not (tmp_path/'timing.json').exists()
    with pytest.warns(UserWarning, match='OPENBLAS_CORETYPE'):
        StageTimer('demo')
    monkeypatch.setenv('OPENBLAS_CORETYPE', blas_cores()[0])
    StageTimer('label', tmp_path/'timing.json').save()
    assert (tmp_path/'timing.json').exists()


def test_shown_paths_are_the_same_on_every_clone(tmp_path):
    "A path inside the repo shows relative to its root (messages and metrics then match across clones); others stay absolute."
    from teduo.core import repo_root, shown
    assert shown(repo_root()/'outputs'/'webshop'/'sft'/'train.jsonl') == 'outputs/webshop/sft/train.jsonl'
    assert shown('outputs/x.json') == 'outputs/x.json'
    assert shown(tmp_path/'a.json') == str(tmp_path/'a.json')
