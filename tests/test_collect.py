"""Unlabeled data collection: determinism, schema, and refusal of bad files."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teduo.babyai import World, achieved_batch
from teduo.collect import (plan_episodes, collect_episodes, episodes_to_table, save_transitions, load_transitions,
                           SCHEMA_VERSION)

WORLD = World()
POL = {'bot': 0.5, 'noisy_bot': 0.3, 'random': 0.2}


def _collect(tmp, name, n_workers, seed=0):
    specs = plan_episodes(60, list(range(12)), POL, seed)
    eps = collect_episodes(WORLD, specs, step_cap=24, epsilon=0.25, n_workers=n_workers, chunk=9, progress=False)
    p = tmp/name; save_transitions(episodes_to_table(eps, WORLD), p); return p


def test_deterministic_bytes_any_worker_count(tmp_path):
    a, b, c = _collect(tmp_path, 'a.parquet', 1), _collect(tmp_path, 'b.parquet', 2), _collect(tmp_path, 'c.parquet', 1, seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_dataset_is_unlabeled_and_consistent(tmp_path):
    p = _collect(tmp_path, 'd.parquet', 1)
    cols = set(pq.read_schema(p).names)
    assert cols == {'episode', 'step', 'layout_seed', 'episode_seed', 'policy', 'state', 'action', 'next_state'}
    assert not any(k in c for c in cols for k in ('reward', 'instruction', 'mission', 'success', 'done'))
    d = load_transitions(p)
    assert d.states.shape[1] == 2 + 3*81 + 6 and set(np.unique(d.policy)) <= {'bot', 'noisy_bot', 'random'}
    assert d.n_episodes == 60 and (d.layout_seed < 12).all()
    # random actions change the state only through the env's own dynamics: a state repeats with a turn back
    assert ((d.actions >= 0) & (d.actions <= 6)).all()
    # the dataset holds real progress: some states achieve common goals
    assert achieved_batch(d.next_states, 'open a door').any()


def _rewrite(src, dst, table):
    pq.write_table(table, dst)
    return dst


def test_loader_refuses_bad_files(tmp_path):
    p = _collect(tmp_path, 'ok.parquet', 1)
    t = pq.read_table(p)
    with pytest.raises(FileNotFoundError, match='no such dataset'): load_transitions(tmp_path/'missing.parquet')
    (tmp_path/'trunc.parquet').write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(ValueError, match='corrupt or truncated'): load_transitions(tmp_path/'trunc.parquet')
    (tmp_path/'junk.parquet').write_bytes(b'not parquet at all')
    with pytest.raises(ValueError, match='corrupt or truncated'): load_transitions(tmp_path/'junk.parquet')
    meta = t.schema.metadata
    with pytest.raises(ValueError, match='schema version'):
        load_transitions(_rewrite(p, tmp_path/'v.parquet', t.replace_schema_metadata({**meta, b'teduo.schema': b'other/9'})))
    with pytest.raises(ValueError, match="columns differ"):
        load_transitions(_rewrite(p, tmp_path/'c.parquet', t.drop_columns(['action']).replace_schema_metadata(meta)))
    bad_action = t.set_column(t.schema.get_field_index('action'), 'action', pa.array(np.full(len(t), 9, np.int8)))
    with pytest.raises(ValueError, match='actions outside'):
        load_transitions(_rewrite(p, tmp_path/'a.parquet', bad_action.replace_schema_metadata(meta)))
    shuffled = t.take(np.random.default_rng(0).permutation(len(t)))
    with pytest.raises(ValueError, match='contiguous'):
        load_transitions(_rewrite(p, tmp_path/'s.parquet', shuffled.replace_schema_metadata(meta)))
    with pytest.raises(ValueError, match="unknown behaviour policy|unknown policies"):
        plan_episodes(3, [0], {'expert': 1.0}, 0)


def test_zero_episodes_is_refused_at_collect_and_an_empty_file_when_loaded(tmp_path):
    for n in (0, -5):
        with pytest.raises(ValueError, match=rf'params collect.n_episodes: got {n}, expected an integer >= 1'):
            plan_episodes(n, list(range(4)), POL, 0)
    p = tmp_path/'empty.parquet'
    save_transitions(episodes_to_table([], WORLD), p)  # what collect wrote for n_episodes: 0 before it was refused
    with pytest.raises(ValueError, match=rf'{p}: no transitions .*collect.n_episodes >= 1'): load_transitions(p)


def test_schema_version_constant():
    assert SCHEMA_VERSION.startswith('teduo.babyai.transitions/')
