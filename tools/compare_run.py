"""Did this checkout's run reproduce the committed one? After `make repro` on a fresh clone, compare every output that
dvc.lock records with the committed dvc.lock (`git show HEAD:dvc.lock`), and every tracked metrics file with its
committed bytes. Usage: `make compare` (or `python tools/compare_run.py [REF]`). Exit 1 if a result differs.

Outputs that differ between runs by design, reported but not counted: the timing records (metrics/timing*: wall
times, the README's line that sums them, and reports/timing.png, their plot). Executed notebooks (reports/*.ipynb)
and LLM memo files (outputs/llm_cache/) are logs and caches, not DVC outputs, so dvc.lock does not record them.
Everything else (datasets, labels, policies, adapters, episode logs, tables, figures, metrics) must be byte-identical."""
import subprocess, sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
def by_design(path:str)->bool:
    "Is this output a timing record, which differs between runs by design (see above)?"
    return path.startswith('metrics/timing') or path == 'reports/timing.png'
WALL_LINE = 'Wall time of the default'  # the README line of metrics/timing.json


def outs(lock:dict)->dict[str, tuple]:
    "path -> (md5, size, nfiles) of every stage output a dvc.lock records."
    return {o['path']: (o.get('md5'), o.get('size'), o.get('nfiles'))
            for st in lock.get('stages', {}).values() for o in st.get('outs', [])}


def readme_same(git, ref:str)->bool:
    "README.md equals the committed one but for the line with the run's wall time."
    strip = lambda t: [l for l in t.splitlines() if not l.startswith(WALL_LINE)]
    return strip((ROOT/'README.md').read_text()) == strip(git('show', f'{ref}:README.md').stdout)


def main(ref:str='HEAD')->int:
    git = lambda *a: subprocess.run(['git', '-C', str(ROOT), *a], capture_output=True, text=True)
    shown = git('show', f'{ref}:dvc.lock')
    if shown.returncode: sys.exit(f"git show {ref}:dvc.lock failed: {shown.stderr.strip()}")
    old, new = outs(yaml.safe_load(shown.stdout)), outs(yaml.safe_load((ROOT/'dvc.lock').read_text()))
    if set(old) != set(new):
        print(f"outputs only in {ref}: {sorted(set(old) - set(new))}; only in this run: {sorted(set(new) - set(old))}")
    same, volatile, differ = [], [], []
    for p in sorted(set(old) | set(new)):
        if old.get(p) == new.get(p): same.append(p)
        elif by_design(p): volatile.append(p)
        else: differ.append(p)
    changed = [l[3:] for l in git('status', '--porcelain', '--', 'metrics', 'README.md').stdout.splitlines()]
    changed = [p for p in changed if not by_design(p) and not (p == 'README.md' and readme_same(git, ref))]
    print(f"dvc.lock outputs vs {ref}: {len(same)} identical, {len(volatile)} differ by design (timing records)")
    for p in volatile: print(f"  by design: {p}")
    for p in differ: print(f"  RESULT DIFFERS: {p}  {old.get(p)} -> {new.get(p)}")
    for p in changed: print(f"  TRACKED FILE CHANGED: {p}  (git diff -- {p})")
    ok = not differ and not changed and set(old) == set(new)
    print('reproduced: every result is byte-identical' if ok else 'NOT reproduced: see the lines above')
    return 0 if ok else 1


if __name__ == '__main__': sys.exit(main(*sys.argv[1:2]))
