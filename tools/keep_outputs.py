"""Run the step notebooks' tiny examples and keep their small outputs in nbs/ (STYLE.md: a reader on GitHub sees what
each step does without running it). Usage: `make outputs` (or `python tools/keep_outputs.py [nbs/X.ipynb ...]`).

Each notebook runs top to bottom at its smoke-sized defaults, in nbs/ (as `nbdev_test` runs it), with cells flagged
`#| slow`, `#| gpu` or `#| eval: false` skipped. What is kept: printed text, results and pictures of the examples.
What is dropped, so that committed outputs are small and hold nothing of one machine or run: stderr (progress
bars, warnings), the outputs of a stage cell (it times itself), anything naming a temporary or local path, and any
output over the size limits. Then `nbdev_clean` strips execution counts and metadata."""
import json, subprocess, sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SKIP_FLAGS = ('#| slow', '#| gpu', '#| eval: false', '#|eval: false')
TIMED = ('StageTimer(', 'perf_counter')  # cells whose outputs hold wall times
LOCAL = ('/tmp', str(ROOT), '/home/', '/work/')  # paths that name one machine or run
MAX_TEXT, MAX_IMAGE = 4_000, 80_000  # characters of a text output, of a base64 picture


def _text(o)->str:
    if o.get('output_type') == 'stream': return ''.join(o.get('text', ''))
    return ''.join(''.join(v) if isinstance(v, list) else str(v) for k, v in o.get('data', {}).items() if k.startswith('text'))


def keep(o)->bool:
    "Is this output small, deterministic in kind and free of local paths?"
    if o.get('output_type') == 'error' or (o.get('output_type') == 'stream' and o.get('name') == 'stderr'): return False
    t = _text(o)
    if any(p in t for p in LOCAL) or len(t) > MAX_TEXT: return False
    img = o.get('data', {}).get('image/png', '')
    return len(img) <= MAX_IMAGE and (bool(t.strip()) or bool(img))


def run(path:Path)->tuple[int, int]:
    "Execute one notebook's examples and keep their filtered outputs: (code cells with outputs, pictures)."
    nb = nbformat.read(path, as_version=4)
    saved = {}
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'code' and c.source.lstrip().startswith(SKIP_FLAGS): saved[i] = c.source; c.source = 'pass'
    NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}},
                   allow_errors=False).execute()
    n = pics = 0
    for i, c in enumerate(nb.cells):
        if c.cell_type != 'code': continue
        if i in saved: c.source, c.outputs = saved[i], []
        if any(t in c.source for t in TIMED): c.outputs = []
        c.outputs = [o for o in c.outputs if keep(o)]
        for o in c.outputs:
            if 'execution_count' in o: o['execution_count'] = None
            for k in [k for k in o.get('data', {}) if k not in ('text/plain', 'text/html', 'text/markdown', 'image/png')]: del o['data'][k]
        n += bool(c.outputs); pics += sum('image/png' in o.get('data', {}) for o in c.outputs)
    nbformat.write(nb, path)
    return n, pics


def main(paths:list[str])->int:
    nbs = [Path(p).resolve() for p in paths] or sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    total = 0
    for p in nbs:
        n, pics = run(p); total += n
        print(f"{p.name}: {n} code cells keep outputs, {pics} pictures", flush=True)
    subprocess.run([str(Path(sys.executable).with_name('nbdev_clean'))], cwd=ROOT, check=True)
    print(f"{total} code cells with outputs in {len(nbs)} notebooks")
    return 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
