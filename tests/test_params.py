"""params.yaml validation (teduo.params): the committed file is valid, every bad value of issue 12 is refused with its
param path, all problems come in one message, the CLI exits non-zero, and every dvc.yaml stage runs it first."""
import copy, dataclasses, os, subprocess, sys
from pathlib import Path

import pytest
import yaml

from teduo.babyai import World
from teduo.finetune import FINETUNE_KEYS
from teduo.llm import LLMConfig
from teduo.params import (SCHEMA, LLM_ROLE, FINETUNE_TRAIN, ParamsError, load_valid_params, param_problems, validate)
from teduo.webshop.collect import View

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT/'params.yaml').read_text())
STAGES = yaml.safe_load((ROOT/'dvc.yaml').read_text())['stages']
VALIDATE = 'python -m teduo.params params.yaml && papermill '


def edited(edit)->dict:
    p = copy.deepcopy(PARAMS); edit(p); return p


def at(p:dict, dotted:str)->tuple[dict, str]:
    "(the mapping holding `dotted`, its last key)."
    *head, last = dotted.split('.')
    for k in head: p = p[k]
    return p, last


def set_(dotted, value):
    def edit(p): d, k = at(p, dotted); d[k] = value
    return edit


def rename(dotted, new):
    def edit(p): d, k = at(p, dotted); d[new] = d.pop(k)
    return edit


def message(edit)->str:
    with pytest.raises(ParamsError) as e: validate(edited(edit))
    return str(e.value)


def test_committed_params_are_valid():
    assert param_problems(PARAMS) == []
    assert load_valid_params('params.yaml') == PARAMS


def test_paper_scale_params_are_valid():
    "The README's paper-scale overrides pass (a bound too tight for the paper would be a bug)."
    def edit(p):
        p['babyai'].update(room_size=8, num_rows=3, num_cols=3, num_dists=18, max_steps=500)
        p['goals'].update(n_train=500, n_test=100); p['collect']['n_episodes'] = 40000; p['label']['states_per_goal'] = 5000
        p['base']['llm']['policy'] = {'model': 'meta-llama/Meta-Llama-3-8B-Instruct', 'dtype': 'bfloat16', 'device': 'cuda', 'batch_size': 32}
        for r in ('abstraction', 'labeling'):
            p['base']['llm'][r] = {'model': 'meta-llama/Meta-Llama-3-70B-Instruct', 'dtype': 'bfloat16', 'device': 'auto', 'batch_size': 16}
        p['abstract']['mode'] = 'generate'; p['sft_data']['max_examples'] = None
        p['finetune'].update(lora_r=512, lora_alpha=512, lora_dropout=0.1, lr=2e-5, batch_size=10, epochs=3)
        p['evaluate'].update(goals_per_quadrant=None, episodes_per_cell=400, llm_episodes_per_cell=None, max_steps=500, replan_every=1)
    assert param_problems(edited(edit)) == []


def test_schema_covers_every_section():
    assert set(SCHEMA.required) == set(PARAMS), 'a params.yaml section without a spec (or a spec without a section)'
    declared = {p.split('.')[0] for st in STAGES.values() for p in st['params']}
    assert declared <= set(SCHEMA.required)


def test_specs_follow_the_code_they_describe():
    "Keys that mirror a dataclass or a list in the code must change with it."
    assert set(LLM_ROLE.required) | set(LLM_ROLE.optional) == {f.name for f in dataclasses.fields(LLMConfig)}
    assert sorted(FINETUNE_TRAIN) == sorted(FINETUNE_KEYS)
    assert set(SCHEMA.required['webshop'].required['view'].required) == {f.name for f in dataclasses.fields(View)}
    assert {f.name for f in dataclasses.fields(World)} <= set(SCHEMA.required['babyai'].required)


# The bad values of issue 12: each refused, with the param path in the message.
ISSUE_CASES = {
    'unknown babyai.num_dist': (rename('babyai.num_dists', 'num_dist'), 'params.yaml: babyai.num_dist: unknown key (did you mean num_dists?)'),
    'unknown collect.n_episdoes': (rename('collect.n_episodes', 'n_episdoes'),
                                   'params.yaml: collect.n_episdoes: unknown key (did you mean n_episodes?)'),
    'unknown evaluate.temprature': (rename('evaluate.temperature', 'temprature'),
                                    'params.yaml: evaluate.temprature: unknown key (did you mean temperature?)'),
    'label.states_per_goal -3': (set_('label.states_per_goal', -3), 'params.yaml: label.states_per_goal: -3, expected an integer >= 1'),
    'label.heldout 1.5': (set_('label.heldout', 1.5), 'params.yaml: label.heldout: 1.5, expected a number in (0, 1)'),
    'babyai.locked_room_prob 7': (set_('babyai.locked_room_prob', 7), 'params.yaml: babyai.locked_room_prob: 7, expected a number in [0, 1]'),
    'collect.epsilon 5': (set_('collect.epsilon', 5), 'params.yaml: collect.epsilon: 5, expected a number in [0, 1]'),
    'negative goals.kinds weight': (set_('goals.kinds.open', -0.1), 'params.yaml: goals.kinds.open: -0.1, expected a number >= 0'),
    'babyai.num_dists 200': (set_('babyai.num_dists', 200), 'params.yaml: babyai.num_dists: 200 distractors, at most 12 fit 2x2 rooms of size 6'),
    'collect.n_episodes 0': (set_('collect.n_episodes', 0), 'params.yaml: collect.n_episodes: 0, expected an integer >= 1'),
    'a layout range over the worked examples': (set_('babyai.test_layouts', {'start': 10**8, 'count': 50}),
        'params.yaml: babyai.test_layouts: contains layout 100000007, the in-context baseline\'s worked examples'),
    'evaluate.baseline_state pixels': (set_('evaluate.baseline_state', 'pixels'), 'params.yaml: evaluate.baseline_state: \'pixels\', expected'),
}


@pytest.mark.parametrize('case', list(ISSUE_CASES))
def test_issue_case_is_refused_with_its_path(case):
    edit, expected = ISSUE_CASES[case]
    assert expected in message(edit)


# Choices come from the code that acts on them.
ENUM_CASES = {
    'abstract.source': (set_('abstract.source', 'gpt'), "abstract.source: 'gpt', expected llm, oracle or none"),
    'abstract.mode': (set_('abstract.mode', 'beam'), "abstract.mode: 'beam', expected constrained or generate"),
    'label.labeler': (set_('label.labeler', 'orcale'), "label.labeler: 'orcale', expected llm or oracle (did you mean oracle?)"),
    'label.calibration': (set_('label.calibration', 'platt'), "label.calibration: 'platt', expected contextual, prior or none"),
    'offline_rl.runs algorithm': (set_('offline_rl.runs', [{'algorithm': 'sarsa', 'labels': 'llm'}]),
                                  "offline_rl.runs[0].algorithm: 'sarsa', expected q_learning, dqn or filtered_bc"),
    'offline_rl.runs labels': (set_('offline_rl.runs', [{'algorithm': 'q_learning', 'labels': 'human'}]),
                               "offline_rl.runs[0].labels: 'human', expected llm or oracle"),
    'evaluate.agents': (set_('evaluate.agents', ['random', 'tabluar']), "evaluate.agents[1]: 'tabluar', expected random, bot, teduo"),
    'collect.policies': (set_('collect.policies', {'bot': 1, 'expert': 1}), 'collect.policies.expert: unknown key'),
    'baselines.gcbc.labels': (set_('baselines.gcbc.labels', 'gt'), "baselines.gcbc.labels: 'gt', expected llm or oracle"),
    'base dtype': (set_('base.llm.policy.dtype', 'bf16'), "base.llm.policy.dtype: 'bf16', expected bfloat16, float16 or float32 (did you mean bfloat16?)"),
    'base backend': (set_('base.llm.labeling.backend', 'vllm'), "base.llm.labeling.backend: 'vllm', expected transformers or openai"),
    'webshop_collect.keywords': (set_('webshop_collect.keywords', 'query'), "webshop_collect.keywords: 'query', expected llm or instruction"),
    'webshop_label.calibration': (set_('webshop_label.calibration', 'prior'), "webshop_label.calibration: 'prior', expected contextual or none"),
    'webshop_evaluate.policies': (set_('webshop_evaluate.policies', ['teduo', 'zero-shot']),
                                  "webshop_evaluate.policies[1]: 'zero-shot', expected behaviour, rule, zero_shot, zero_shot_plain, teduo or teduo_oracle (did you mean zero_shot?)"),
}


@pytest.mark.parametrize('case', list(ENUM_CASES))
def test_choices_are_the_codes(case):
    edit, expected = ENUM_CASES[case]
    assert f"params.yaml: {expected}" in message(edit)


# Every other section, and the rules across params.
OTHER_CASES = {
    'base.seed': (set_('base.seed', -1), 'base.seed: -1, expected an integer in [0, 4294967295]'),
    'unknown llm key': (set_('base.llm.policy.dtyp', 'float32'), 'base.llm.policy.dtyp: unknown key (did you mean dtype?)'),
    'llm batch_size': (set_('base.llm.abstraction.batch_size', 0), 'base.llm.abstraction.batch_size: 0, expected an integer >= 1'),
    'llm model missing': (lambda p: p['base']['llm']['policy'].pop('model'), 'base.llm.policy.model: missing'),
    'openai without base_url': (set_('base.llm.labeling.backend', 'openai'), 'base.llm.labeling.base_url: missing, expected a URL'),
    'unknown llm role': (rename('base.llm.labeling', 'labelling'), 'base.llm.labelling: unknown key (did you mean labeling?)'),
    'unknown section': (rename('webshop_collect', 'webshop_colect'), 'webshop_colect: unknown section (did you mean webshop_collect?)'),
    'missing section': (lambda p: p.pop('figures'), 'figures: missing'),
    'overlapping layouts': (set_('babyai.test_layouts', {'start': 150, 'count': 50}), 'babyai.test_layouts: train and test layouts share seeds [150'),
    'locked single room': (lambda p: p['babyai'].update(num_rows=1, num_cols=1, num_dists=1), 'babyai.locked_room_prob: 0.5 with a single room'),
    'lr written 1e-4': (set_('finetune.lr', '1e-4'), "finetune.lr: '1e-4', expected a number > 0 (YAML 1.1 reads 1e-4 as text"),
    'bool as count': (set_('finetune.epochs', True), 'finetune.epochs: True, expected a number > 0'),
    'finetune max_steps 0': (set_('finetune.max_steps', 0), 'finetune.max_steps: 0, expected -1 or an integer >= 1'),
    'sft policy not a run': (set_('sft_data.policy', 'filtered_bc_llm'), "sft_data.policy: 'filtered_bc_llm', expected a policy offline_rl.runs writes"),
    'agent without its run': (set_('offline_rl.runs', [{'algorithm': 'q_learning', 'labels': 'llm'}]),
                              "evaluate.agents[5]: 'tabular_oracle' acts with the q_learning_oracle policy"),
    'duplicate run': (set_('offline_rl.runs', [{'algorithm': 'q_learning', 'labels': 'llm'}] * 2), 'offline_rl.runs: '),
    'control policy not a run': (set_('sft_data.oracle_control.policy', 'q_learning_orcale'),
                                 "sft_data.oracle_control.policy: 'q_learning_orcale', expected a policy offline_rl.runs writes"),
    'oracle agent without its adapter': (lambda p: p['evaluate']['inputs'].pop('adapter_oracle'),
                                         'evaluate.inputs.adapter_oracle: missing: evaluate.agents lists teduo_oracle'),
    'sft max_examples': (set_('sft_data.max_examples', 0), 'sft_data.max_examples: 0, expected null or an integer >= 1'),
    'figures.frames_per_strip': (set_('figures.frames_per_strip', 'eight'), "figures.frames_per_strip: 'eight', expected an integer >= 1"),
    'empty path': (set_('collect.out', ''), "collect.out: '', expected a path"),
    'webshop view': (set_('webshop.view.title_word', 10), 'webshop.view.title_word: unknown key (did you mean title_words?)'),
    'webshop goals overlap': (set_('webshop.test_goals', {'start': 1550, 'count': 10}), 'webshop.test_goals: [1550, 1560) overlaps'),
    'webshop click weight': (set_('webshop_collect.click_weights.buy', -1), 'webshop_collect.click_weights.buy: -1, expected a number >= 0'),
    'webshop positive': (set_('webshop_label.positive', 1.2), 'webshop_label.positive: 1.2, expected a number in [0, 1]'),
    'webshop_sft validation': (set_('webshop_sft.validation', 1), 'webshop_sft.validation: 1, expected a number in [0, 1)'),
    'webshop_finetune.train': (rename('webshop_finetune.train.lora_r', 'lora_rank'), 'webshop_finetune.train.lora_rank: unknown key (did you mean lora_r?)'),
    'webshop episodes': (set_('webshop_evaluate.episodes.train', 500), 'webshop_evaluate.episodes.train: 500, more than the 100 goals'),
    'webshop max_new_tokens': (set_('webshop_evaluate.max_new_tokens.react', 0), 'webshop_evaluate.max_new_tokens.react: 0, expected an integer >= 1'),
    'webshop train_split': (set_('webshop_evaluate.train_split', 'demonstarted'),
                            "webshop_evaluate.train_split: 'demonstarted', expected demonstrated or first (did you mean demonstrated?)"),
    'webshop max_episodes policy': (set_('webshop_evaluate.max_episodes', {'zero-shot': 5}),
                                    'webshop_evaluate.max_episodes.zero-shot: unknown policy (did you mean zero_shot?)'),
    'webshop sft labels': (set_('webshop_sft.oracle_control.labels', 'true'), "webshop_sft.oracle_control.labels: 'true', expected llm or oracle"),
    'webshop teduo_oracle without its control': (lambda p: p['webshop_finetune'].pop('oracle_control'),
                                                 'webshop_finetune.oracle_control: missing: webshop_evaluate.policies lists teduo_oracle'),
    'evaluate max_new_tokens typo': (set_('evaluate.max_new_tokens', 'atuo'), "evaluate.max_new_tokens: 'atuo', expected auto (did you mean auto?)"),
    'evaluate max_new_tokens 0': (set_('evaluate.max_new_tokens', 0), 'evaluate.max_new_tokens: 0, expected an integer >= 1'),
    'evaluate retries': (set_('evaluate.retries', -1), 'evaluate.retries: -1, expected an integer >= 0'),
    'evaluate retry_temperature': (set_('evaluate.retry_temperature', -0.5), 'evaluate.retry_temperature: -0.5, expected a number >= 0'),
    'llm episodes agent typo': (set_('evaluate.llm_episodes_per_cell', {'tedou': 10}),
                                'evaluate.llm_episodes_per_cell.tedou: unknown LLM agent (did you mean teduo?)'),
    'llm episodes 0': (set_('evaluate.llm_episodes_per_cell.llm_in_context', 0),
                       'evaluate.llm_episodes_per_cell.llm_in_context: 0, expected null or an integer >= 1'),
    'llm episodes text': (set_('evaluate.llm_episodes_per_cell', 'all'), "evaluate.llm_episodes_per_cell: 'all', expected null or an integer >= 1 or a mapping"),
}


@pytest.mark.parametrize('case', list(OTHER_CASES))
def test_other_bad_values_are_refused(case):
    edit, expected = OTHER_CASES[case]
    assert f"params.yaml: {expected}" in message(edit)


def test_all_problems_in_one_message():
    def edit(p):
        for e in (rename('collect.n_episodes', 'n_episdoes'), set_('label.heldout', 1.5), set_('babyai.num_dists', 200),
                  set_('webshop_label.labeler', 'human')): e(p)
    lines = message(edit).splitlines()
    assert lines[0] == 'params.yaml: 5 problems' and len(lines) == 6  # the typo also leaves n_episodes missing
    assert all(l.startswith('params.yaml: ') for l in lines)


def test_a_rule_waits_for_its_params():
    "A broken value is reported once, by its spec, not again by a rule that reads it."
    msg = message(set_('babyai.num_rows', 'two'))
    assert msg == "params.yaml: babyai.num_rows: 'two', expected an integer >= 1"


def test_unreadable_files(tmp_path):
    with pytest.raises(ParamsError, match='cannot read it'): load_valid_params(tmp_path/'absent.yaml')
    (tmp_path/'bad.yaml').write_text('base: [1\n')
    with pytest.raises(ParamsError, match='not valid YAML'): load_valid_params(tmp_path/'bad.yaml')
    (tmp_path/'empty.yaml').write_text('')
    with pytest.raises(ParamsError, match='expected a mapping'): load_valid_params(tmp_path/'empty.yaml')


def test_world_refuses_layouts_minigrid_cannot_build():
    "The fail-fast guard where layouts are generated: a World minigrid would loop on is never built."
    with pytest.raises(ValueError, match='num_dists: 200 distractors, at most 7'): World(num_dists=200)
    with pytest.raises(ValueError, match='params.yaml:babyai: locked_room_prob: 0.5 with a single room'):
        World.from_params({**PARAMS['babyai'], 'num_rows': 1, 'num_cols': 1, 'num_dists': 1})
    World(room_size=8, num_rows=3, num_cols=3, num_dists=18)  # the paper's world


def _cli(*args, cwd=ROOT):
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}  # this checkout's teduo, whatever the venv's editable install points at
    return subprocess.run([sys.executable, '-m', 'teduo.params', *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_cli_accepts_the_committed_params():
    r = _cli('params.yaml')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [f'params.yaml: valid ({len(PARAMS)} sections)']


def test_cli_exits_2_with_every_problem(tmp_path):
    bad = edited(lambda p: (rename('collect.n_episodes', 'n_episdoes')(p), set_('label.heldout', 1.5)(p)))
    f = tmp_path/'params.yaml'; f.write_text(yaml.safe_dump(bad, sort_keys=False))
    r = _cli(str(f))
    assert r.returncode == 2 and r.stdout == ''
    assert f'{f}: collect.n_episdoes: unknown key (did you mean n_episodes?)' in r.stderr
    assert f'{f}: label.heldout: 1.5, expected a number in (0, 1)' in r.stderr


@pytest.mark.parametrize('name', sorted(STAGES))
def test_every_stage_validates_params_first(name):
    st = STAGES[name]
    assert st['cmd'].startswith(VALIDATE), f'{name}: {st["cmd"]!r} does not start with the params check'
    assert 'teduo/params.py' in st['deps'], f'{name}: the params check is part of the stage: list teduo/params.py in deps'
