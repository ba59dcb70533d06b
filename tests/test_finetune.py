"""Step 3, fine-tuning: the loss covers only the answer (our tokenization and the labels TRL actually builds), and a
tiny llama LoRA-tuned with `finetune_lora` on a toy set lowers its loss and reproduces the memorised answers."""
import json

import numpy as np
import pytest

from teduo.core import write_jsonl, read_json
from teduo.finetune import finetune_lora, completion_mask_of, file_hash, FINETUNE_KEYS, answer_loss, answer_loss_trainer, sort_adapter_config
from teduo.llm import LLM, LLMConfig, load_hf, model_fingerprint

ROWS = [{'prompt': [{'role': 'system', 'content': 'Answer with actions.'}, {'role': 'user', 'content': f'Goal: {g}'}],
         'completion': [{'role': 'assistant', 'content': a}]}
        for g, a in [('go to the red ball', '[2, 2, 1]'), ('pick up the green key', '[1, 3]'),
                     ('open the blue door', '[0, 2, 5]'), ('go to the tile (3,1)', '[2]')]]
CFG = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, target_modules='all-linear', lr=1e-2, batch_size=4, grad_accum=1,
           epochs=1, max_steps=20, max_length=128, eval_steps=10, logging_steps=5, bf16=False, warmup_steps=0)


@pytest.fixture(scope='module')
def tok(tiny_llama):
    t, _ = load_hf(str(tiny_llama), 'float32')
    return t


def _suffix(tok, row):
    "What the chat template adds for the answer: the rendered full chat minus the rendered prompt."
    full = tok.apply_chat_template(row['prompt'] + row['completion'], tokenize=False)
    prompt = tok.apply_chat_template(row['prompt'], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)
    return full[len(prompt):]


def test_completion_mask_covers_only_the_answer_and_end_of_turn(tok):
    for row in ROWS:
        ids, mask = completion_mask_of(row, tok)
        assert len(ids) == len(mask) and set(mask) == {0, 1}
        k = mask.index(1)
        assert all(mask[k:]) and not any(mask[:k]), 'one contiguous answer span at the end'
        answer = row['completion'][0]['content']
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == answer + '<|im_end|>\n' == _suffix(tok, row)
        assert tok.decode(ids[:k]).endswith('<|im_start|>assistant\n')
    ids, mask = completion_mask_of(ROWS[0], tok, max_length=10)
    assert len(ids) == len(mask) == 10 and not any(mask)


def test_trl_labels_are_masked_outside_the_answer(tiny_llama, tok, tmp_path):
    """The labels SFTTrainer's collator really builds: -100 on the prompt and padding, the token ids on the answer and
    the template's end of turn, identical to `completion_mask_of`."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    tok.padding_side = 'right'
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, use_cpu=True, report_to=[], max_length=128)
    tr = SFTTrainer(model=lm, args=args, train_dataset=datasets.Dataset.from_list(ROWS[:2]), processing_class=tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(2)])
    for i, row in enumerate(ROWS[:2]):
        ids, mask = completion_mask_of(row, tok)
        x, lab, att = (batch[k][i].tolist() for k in ('input_ids', 'labels', 'attention_mask'))
        n = sum(att)
        assert x[:n] == ids and all(a == 0 for a in att[n:])
        assert lab[:n] == [t if m else -100 for t, m in zip(ids, mask)] and all(l == -100 for l in lab[n:])
        assert tok.decode([t for t in lab if t != -100]) == _suffix(tok, row)


def test_answer_loss_equals_trls_loss_and_gradient(tiny_llama, tok, tmp_path):
    """Our loss (logits of the answer positions only) is TRL's token-summed NLL of the fused LM head: same value and
    same gradients on a collated batch, with and without `num_items_in_batch`."""
    import datasets, torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    tok.padding_side = 'right'
    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, use_cpu=True, report_to=[], max_length=128)
    def grads_and_loss(cls, n):
        torch.manual_seed(0)
        lm = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
        tr = cls(model=lm, args=args, train_dataset=datasets.Dataset.from_list(ROWS[:3]), processing_class=tok)
        batch = tr.data_collator([tr.train_dataset[i] for i in range(3)])
        tr.model.train(); loss = tr.compute_loss(tr.model, dict(batch), num_items_in_batch=n); loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}
    for n in (None, torch.tensor(40)):
        ref, g_ref = grads_and_loss(SFTTrainer, n)
        ours, g = grads_and_loss(answer_loss_trainer(), n)
        assert ours == pytest.approx(ref, rel=1e-5) and set(g) == set(g_ref)
        assert all(torch.allclose(g[k], g_ref[k], rtol=1e-4, atol=1e-6) for k in g)


@pytest.fixture(scope='module')
def tuned(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp('finetune')
    write_jsonl(ROWS * 4, d/'train.jsonl'); write_jsonl(ROWS, d/'validation.jsonl')
    summary = finetune_lora(d/'train.jsonl', d/'validation.jsonl', LLMConfig(str(tiny_llama), dtype='float32'), CFG,
                            d/'adapter', d/'curves.json', seed=0)
    return d, summary


def test_finetune_lowers_the_loss(tuned, tiny_llama):
    d, s = tuned
    curves = read_json(d/'curves.json')
    val = curves['validation']
    assert val[0]['step'] == 0 and val[0]['loss'] == pytest.approx(s['initial_validation_loss'])
    assert s['best_validation_loss'] == min(v['loss'] for v in val) < 0.5*s['initial_validation_loss']
    tr = [c['loss'] for c in curves['train']]
    assert len(tr) == CFG['max_steps'] // CFG['logging_steps'] and tr[-1] < tr[0]
    assert s['steps'] == CFG['max_steps'] and s['train_examples'] == 16 and s['validation_examples'] == 4
    assert s['data_sha256'] == file_hash(d/'train.jsonl', d/'validation.jsonl')
    assert s['base_fingerprint'] == model_fingerprint(LLMConfig(str(tiny_llama), dtype='float32'))
    meta = read_json(d/'adapter'/'teduo_meta.json')
    assert 'train_runtime_s' not in meta and meta['best_validation_loss'] == s['best_validation_loss']
    assert meta['params'] == {k: CFG[k] for k in FINETUNE_KEYS}
    assert (d/'adapter'/'adapter_config.json').exists() and (d/'adapter'/'adapter_model.safetensors').exists()
    assert not list(d.glob('.adapter.tmp*')), 'the adapter folder is written atomically'


def test_tuned_adapter_reproduces_the_memorised_answers(tuned, tiny_llama):
    d, _ = tuned
    prompts, answers = [r['prompt'] for r in ROWS], [r['completion'][0]['content'] for r in ROWS]
    tuned_llm = LLM(LLMConfig(str(tiny_llama), dtype='float32', adapter=str(d/'adapter')))
    assert tuned_llm.generate(prompts, max_new_tokens=12) == answers
    base = LLM(LLMConfig(str(tiny_llama), dtype='float32'))
    assert base.generate(prompts, max_new_tokens=12) != answers
    assert tuned_llm.fingerprint != base.fingerprint, 'cached answers of the base model must not serve the adapter'


def test_finetune_refuses_bad_config_and_empty_data(tiny_llama, tmp_path):
    write_jsonl(ROWS, tmp_path/'train.jsonl')
    with pytest.raises(ValueError, match='unknown keys'):
        finetune_lora(tmp_path/'train.jsonl', None, LLMConfig(str(tiny_llama)), {**CFG, 'learning_rate': 1e-3}, tmp_path/'a')
    with pytest.raises(ValueError, match='missing keys'):
        finetune_lora(tmp_path/'train.jsonl', None, LLMConfig(str(tiny_llama)), {k: v for k, v in CFG.items() if k != 'lr'}, tmp_path/'a')
    assert not (tmp_path/'a').exists()


def test_finetune_empty_training_file_is_a_clear_error(tiny_llama, tmp_path):
    write_jsonl([], tmp_path/'train.jsonl')
    with pytest.raises(ValueError, match='no training examples'):
        finetune_lora(tmp_path/'train.jsonl', None, LLMConfig(str(tiny_llama)), CFG, tmp_path/'a')


def test_finetune_trains_without_validation_when_the_file_is_empty(tiny_llama, tmp_path):
    write_jsonl(ROWS, tmp_path/'train.jsonl'); write_jsonl([], tmp_path/'validation.jsonl')
    s = finetune_lora(tmp_path/'train.jsonl', tmp_path/'validation.jsonl', LLMConfig(str(tiny_llama), dtype='float32'),
                      {**CFG, 'max_steps': 1}, tmp_path/'a')
    assert s['validation_examples'] == 0 and s['steps'] == 1 and s['best_validation_loss'] is None
    assert (tmp_path/'a'/'adapter_config.json').exists()


def test_adapter_config_lists_are_sorted(tuned, tmp_path):
    "PEFT writes target_modules from a set (order follows the hash seed): the saved adapter's lists are sorted."
    d, _ = tuned
    cfg = json.loads((d/'adapter'/'adapter_config.json').read_text())
    assert len(cfg['target_modules']) > 1 and cfg['target_modules'] == sorted(cfg['target_modules'])
    (tmp_path/'adapter_config.json').write_text(json.dumps({'target_modules': ['v_proj', 'k_proj', 'q_proj'], 'r': 4}))
    sort_adapter_config(tmp_path)
    assert json.loads((tmp_path/'adapter_config.json').read_text()) == {'r': 4, 'target_modules': ['k_proj', 'q_proj', 'v_proj']}
    # the base model's absolute path (it follows the checkout's folder) becomes the params' name; the model card goes
    (tmp_path/'adapter_config.json').write_text(json.dumps({'base_model_name_or_path': '/work/a/outputs/models/m', 'r': 4}))
    (tmp_path/'README.md').write_text('base_model: /work/a/outputs/models/m')
    sort_adapter_config(tmp_path, 'outputs/models/m')
    assert json.loads((tmp_path/'adapter_config.json').read_text()) == {'base_model_name_or_path': 'outputs/models/m', 'r': 4}
    assert not (tmp_path/'README.md').exists()


def test_adapter_status_reports_an_untrained_run_and_refuses_a_missing_or_foreign_folder(tmp_path):
    from teduo.finetune import adapter_status, write_untrained
    write_untrained(tmp_path/'none', 'no goal passed the filter')
    assert adapter_status(tmp_path/'none') == 'not trained: no goal passed the filter'
    (tmp_path/'ok').mkdir(); (tmp_path/'ok'/'adapter_config.json').write_text('{}')
    assert adapter_status(tmp_path/'ok') is None
    with pytest.raises(FileNotFoundError, match='no adapter folder at .*missing.*dvc repro'): adapter_status(tmp_path/'missing')
    with pytest.raises(FileNotFoundError, match='no adapter folder at None'): adapter_status(None)
    (tmp_path/'foreign').mkdir(); (tmp_path/'foreign'/'weights.bin').write_text('x')
    with pytest.raises(ValueError, match='foreign: neither adapter_config.json nor teduo_meta.json'): adapter_status(tmp_path/'foreign')


def test_next_action_accuracy_scores_the_first_action_against_the_majority_baseline():
    "Step 3's own metric on known answers: right first action counts, a wrong or unparseable one does not."
    from fakes import ScriptedBackend
    from teduo.finetune import next_action_accuracy
    rows = [{'prompt': [{'role': 'user', 'content': f'Goal: g{i}'}], 'completion': [{'role': 'assistant', 'content': a}]}
            for i, a in enumerate(['[2, 2, 1]', '[1, 3]', '[0, 2, 5]', '[2]', '[5]'])]
    said = {'g0': '[2, 0]', 'g1': '[3, 1]', 'g2': '[0]', 'g3': 'go forward', 'g4': '[5, 5'}  # right, wrong, right, unparseable, right (cut)
    llm = LLM(LLMConfig('scripted'), None, backend=ScriptedBackend(lambda c: said[c[-1]['content'].split(': ')[1]]))
    train = rows[:1] * 3 + rows[1:2]  # first actions 2, 2, 2, 1: the majority answer is 2
    m = next_action_accuracy(llm, rows, train)
    assert (m['n'], m['correct'], m['accuracy'], m['unparseable']) == (5, 3, 0.6, 1)
    assert (m['majority_action'], m['majority_correct'], m['majority_accuracy']) == (2, 2, 0.4)
    assert m['interval'][0] < 0.6 < m['interval'][1] and m['majority_interval'][0] < 0.4 < m['majority_interval'][1]
    assert next_action_accuracy(llm, [], train) == {'n': 0}
    with pytest.raises(ValueError, match='held-out example 0: its answer is not an answer of format'):
        next_action_accuracy(llm, [{**rows[0], 'completion': [{'role': 'assistant', 'content': 'no'}]}], train)
    # the compact format: words, one action an answer; the model's answers are read the same way
    from teduo.policy_prompt import PolicyFormat, format_answer, parse_answer_prefix
    f = PolicyFormat('egocentric', 'words', 'next')
    wrows = [{**r, 'completion': [{'role': 'assistant', 'content': format_answer(parse_answer_prefix(r['completion'][0]['content']), f)}]} for r in rows]
    wsaid = {'g0': 'move forward', 'g1': 'pick up', 'g2': 'turn left, then more', 'g3': 'go forward', 'g4': 'toggle'}
    wllm = LLM(LLMConfig('scripted'), None, backend=ScriptedBackend(lambda c: wsaid[c[-1]['content'].split(': ')[1]]))
    w = next_action_accuracy(wllm, wrows, wrows[:1] * 3 + wrows[1:2], f)
    assert (w['correct'], w['unparseable'], w['majority_action'], w['majority_correct']) == (3, 1, 2, 2)


def test_the_documented_accelerate_config_loads():
    "README and nbs/07 launch multi-GPU fine-tuning with `accelerate launch --config_file accelerate.yaml -m teduo.finetune`."
    from pathlib import Path
    from accelerate.commands.config.config_args import load_config_from_file
    root = Path(__file__).resolve().parents[1]
    c = load_config_from_file(str(root/'accelerate.yaml'))
    assert str(c.distributed_type).endswith('MULTI_GPU') and c.mixed_precision == 'bf16' and c.num_processes >= 2
    assert 'accelerate launch --config_file accelerate.yaml -m teduo.finetune' in (root/'README.md').read_text()
    import teduo.finetune as ft
    assert callable(ft.main)  # the module's CLI the launcher runs
