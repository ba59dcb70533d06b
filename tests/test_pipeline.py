"""dvc.yaml against the notebooks and params.yaml: every stage runs an existing notebook, declares exactly the params
sections that notebook's `parameters` cell defines, depends on files that exist, and writes only param-named paths."""
import ast, json, re, subprocess
from pathlib import Path

import pytest
import yaml

from teduo.llm import LLMConfig

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT/'dvc.yaml').read_text())
PARAMS = yaml.safe_load((ROOT/'params.yaml').read_text())
STAGES = DVC['stages']
VAR = re.compile(r'\$\{([^}]+)\}')


def tracked()->set:
    return set(subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())


VALIDATE = 'python -m teduo.params params.yaml && '  # every stage checks params.yaml before its notebook starts


def notebook_of(stage:dict)->tuple[str, str]:
    "(input notebook, output notebook) of a `python -m teduo.params params.yaml && papermill IN OUT -f params.yaml` command."
    assert stage['cmd'].startswith(VALIDATE), stage['cmd']
    cmd = stage['cmd'][len(VALIDATE):].split()
    assert cmd[0] == 'papermill' and cmd[3:5] == ['-f', 'params.yaml'], stage['cmd']
    return cmd[1], cmd[2]


def parameters_cell(nb_path:Path)->str:
    cells = [c for c in json.loads(nb_path.read_text())['cells'] if 'parameters' in c.get('metadata', {}).get('tags', [])]
    assert len(cells) == 1, f'{nb_path}: {len(cells)} cells tagged parameters'
    return ''.join(cells[0]['source'])


def dict_parameters(src:str)->set:
    "Names assigned a dict (dict(...) or {...}) at the top level of a parameters cell."
    out = set()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            v = node.value
            if isinstance(v, ast.Dict) or (isinstance(v, ast.Call) and getattr(v.func, 'id', None) == 'dict'):
                out.add(node.targets[0].id)
    return out


def paths(entries)->list[str]:
    "Paths of a dvc outs/metrics/plots/deps list (plain strings or {path: options})."
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or []]


def lookup(dotted:str):
    cur = PARAMS
    for k in dotted.split('.'):
        if not isinstance(cur, dict) or k not in cur: raise KeyError(dotted)
        cur = cur[k]
    return cur


def test_dict_parameters_parser():
    assert dict_parameters("a = dict(x=1)\nb = {'y': 2}\nc = None\nd = 3\ne = [dict()]\n") == {'a', 'b'}


@pytest.mark.parametrize('name', sorted(STAGES))
def test_stage_runs_an_existing_notebook_and_logs_it_outside_the_lock(name):
    """The executed notebook is the stage's log (progress bars, wall times): it lands in reports/, gitignored, and is
    not a DVC output, so dvc.lock records results only and a fresh clone's lock equals the committed one."""
    nb_in, nb_out = notebook_of(STAGES[name])
    assert (ROOT/nb_in).is_file() and nb_in in tracked()
    assert nb_in in STAGES[name]['deps'], 'the stage must re-run when its notebook changes'
    assert nb_out.startswith('reports/') and nb_out.endswith('.ipynb')
    assert nb_out not in paths(STAGES[name].get('outs', [])), f"{nb_out}: a log, not a result (it holds wall times)"
    assert '*.ipynb' in (ROOT/'reports'/'.gitignore').read_text().split()


@pytest.mark.parametrize('name', sorted(STAGES))
def test_stage_params_are_the_notebook_parameter_dicts(name):
    """`params: [base.seed, babyai, ...]` names (top level) == the dict variables of the `parameters` cell, so papermill
    `-f params.yaml` injects every section the notebook reads and nothing it ignores."""
    nb_in, _ = notebook_of(STAGES[name])
    declared = {p.split('.')[0] for p in STAGES[name]['params']}
    assert declared == dict_parameters(parameters_cell(ROOT/nb_in))
    for p in STAGES[name]['params']: lookup(p)  # and every declared param exists


@pytest.mark.parametrize('name', sorted(STAGES))
def test_stage_deps_exist(name):
    files = tracked()
    dvc_tracked = [o['path'] for f in ROOT.glob('*.dvc') if f.is_file() for o in yaml.safe_load(f.read_text())['outs']]
    assert 'data' in dvc_tracked
    for d in STAGES[name]['deps']:
        for var in VAR.findall(d): lookup(var)
        if VAR.search(d): continue  # an output of another stage
        under_dvc = [t for t in dvc_tracked if d == t or d.startswith(t.rstrip('/') + '/')]
        if under_dvc:  # input data tracked by a .dvc file: present only after `dvc pull`
            if (ROOT/under_dvc[0]).exists(): assert (ROOT/d).exists(), d
            continue
        assert d in files or any(f.startswith(d.rstrip('/') + '/') for f in files), f'{d}: not a file in git'
        assert (ROOT/d).exists(), d


OUT_XFAIL = {}  # stage: why an output path is not param-named (none now)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=OUT_XFAIL[n])) if n in OUT_XFAIL
                                  else n for n in sorted(STAGES)])
def test_stage_outputs_come_from_params_or_reports(name):
    st = STAGES[name]
    declared = {p.split('.')[0] for p in st['params']}
    for p in paths(st.get('outs')) + paths(st.get('metrics')) + paths(st.get('plots')):
        m = VAR.fullmatch(p)
        assert m or p.startswith('reports/'), f'{name}: output {p!r} is neither ${{param}} nor under reports/'
        if m:
            lookup(m.group(1))
            assert m.group(1).split('.')[0] in declared, f'{name}: writes {p} but does not declare that param'


def _module_imports(src:str, pkg:str='teduo')->set:
    "Module paths (teduo/x.py, teduo/webshop/y.py) imported by `src`, which lives in package `pkg`."
    out = set()
    for m in re.findall(r'^\s*from\s+([.\w]+)\s+import', src, re.M) + re.findall(r'^\s*import\s+(teduo[.\w]*)', src, re.M):
        if m.startswith('.'): m = pkg + '.' + m.lstrip('.')
        if m.startswith('teduo.'): out.add(m.replace('.', '/') + '.py')
    return out


def _code_closure(nb:Path)->set:
    "teduo modules a notebook runs: its own, those its cells import, and what they import (also inside functions)."
    src = '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code')
    todo = _module_imports(src) | {f"teduo/{m.replace('.', '/')}.py" for m in re.findall(r'#\|\s*default_exp\s+([.\w]+)', src)}
    seen = set()
    while todo:
        m = todo.pop()
        if m in seen or not (ROOT/m).exists(): continue
        seen.add(m); todo |= _module_imports((ROOT/m).read_text(), str(Path(m).parent).replace('/', '.'))
    return seen


CODE_XFAIL = {}  # stage: modules its notebook runs that dvc.yaml does not list under deps (none now)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.xfail(
    strict=True, reason=f"dvc.yaml stage {n}: deps lack {', '.join(CODE_XFAIL[n])}, which its notebook imports "
                        "(directly or through the modules it imports), so editing them does not invalidate the stage"))
    if n in CODE_XFAIL else n for n in sorted(STAGES)])
def test_stage_code_deps_cover_the_modules_its_notebook_runs(name):
    nb_in, _ = notebook_of(STAGES[name])
    need, deps = _code_closure(ROOT/nb_in), {d for d in STAGES[name]['deps'] if d.startswith('teduo/')}
    assert need <= deps, f'missing {sorted(need - deps)}'


def test_every_parametrised_step_notebook_has_a_stage():
    """A notebook with a papermill `parameters` cell is a pipeline step: some stage must run it, with its sections
    in params.yaml."""
    run = {notebook_of(st)[0] for st in STAGES.values()}
    for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb')):
        cells = json.loads(nb.read_text())['cells']
        if any('parameters' in c.get('metadata', {}).get('tags', []) for c in cells):
            rel = str(nb.relative_to(ROOT))
            assert rel in run, f'{rel} has a parameters cell but no dvc.yaml stage runs it'


def test_figures_notebook_has_a_stage_and_params():
    assert 'figures' in PARAMS
    st = [s for s in STAGES.values() if notebook_of(s)[0] == 'nbs/10_figures.ipynb']
    assert len(st) == 1 and {p.split('.')[0] for p in st[0]['params']} == dict_parameters(parameters_cell(ROOT/'nbs'/'10_figures.ipynb'))


@pytest.mark.parametrize('role', ['abstraction', 'labeling', 'policy'])
def test_params_name_a_model_for_every_llm_role(role):
    cfg = PARAMS['base']['llm'][role]
    assert isinstance(cfg.get('model'), str) and cfg['model']
    c = LLMConfig.from_params(cfg, f'params.yaml:base.llm.{role}')
    assert c.model == cfg['model']


def _resolve(p:str)->str:
    m = VAR.fullmatch(p)
    return str(lookup(m.group(1))) if m else p


@pytest.mark.parametrize('name', sorted(STAGES))
def test_dvc_cached_outputs_are_not_tracked_by_git(name):
    "`dvc repro` refuses to write an output git tracks ('already tracked by SCM'): only cache: false ones may be."
    st, git = STAGES[name], tracked()
    for e in (st.get('outs') or []) + (st.get('metrics') or []) + (st.get('plots') or []):
        p, opts = (e, {}) if isinstance(e, str) else next(iter(e.items()))
        if (opts or {}).get('cache', True) is False: continue
        p = _resolve(p).rstrip('/')
        hit = sorted(t for t in git if t == p or t.startswith(p + '/'))
        assert not hit, f'{name}: DVC output {p} is tracked by git ({hit[:3]}): git rm --cached it and ignore it'
