"""One tiny real run per timm flag the trainer used to refuse: each now trains and records its value.

What each flag does is tested where its feature is (test_train_loggers, test_train_naflex,
test_train_scheduled_sizes, test_train_augmix, test_train_script_tta_images, test_train_class_weights,
test_train_multilabel); here every one of them goes through ``train_tfkd.py``'s whole path once.
"""
import json

import pytest
import wandb
import yaml

from _train_helpers import read_summary, tiny_args, train_in_process, use_offline_wandb
from conftest import write_image_folder
from _multilabel_data import K as MULTILABEL_CLASSES, write_wds

NAFLEX_MODEL = ('--model-kwargs', 'embed_dim=32', 'depth=1', 'num_heads=2', 'patch_size=8')
SIZES = ('--train-img-sizes', '16', '24')
AUG_SPLITS = ('--aug-splits', '2')
CLASS_WEIGHTS = ('--tfkd-mode', 'reg', '--loss-class-weight', 'inv_freq')
MULTILABEL = ('--dataset', 'wds/tiny', '--task', 'multilabel', '--target-key', 'labels')

# flag -> (its destination, the run's extra flags, the value args.yaml must record)
FORMERLY_REFUSED = {
    '--log-wandb': ('log_wandb', ('--log-wandb', '--wandb-project', 'tfkd-tests'), True),
    '--naflex-loader': ('naflex_loader', (*NAFLEX_MODEL, '--naflex-loader'), True),
    '--train-img-sizes': ('train_img_sizes', SIZES, [16, 24]),
    '--train-batch-sizes': ('train_batch_sizes', (*SIZES, '--train-batch-sizes', '4', '2'), [4, 2]),
    '--train-size-probs': ('train_size_probs', (*SIZES, '--train-size-probs', '0.25', '0.75'), [0.25, 0.75]),
    '--aug-splits': ('aug_splits', AUG_SPLITS, 2),
    '--split-bn': ('split_bn', (*AUG_SPLITS, '--split-bn'), True),
    '--jsd-loss': ('jsd_loss', (*AUG_SPLITS, '--jsd-loss'), True),
    '--torchscript': ('torchscript', ('--torchscript', '--tfkd-mode', 'reg'), True),
    '--fuser': ('fuser', ('--fuser', 'te'), 'te'),
    '--tta': ('tta', ('--tta', '2'), 2),
    '--save-images': ('save_images', ('--save-images',), True),
    '--class-stats': ('class_stats', (*CLASS_WEIGHTS, '--class-stats', 'STATS'), 'STATS'),
    '--loss-weight-power': ('loss_weight_power', (*CLASS_WEIGHTS, '--class-stats', 'STATS', '--loss-weight-power',
                                                  '0.5'), 0.5),
    '--task': ('task', (*MULTILABEL, '--tfkd-mode', 'lsr'), 'multilabel'),
    '--target-format': ('target_format', (*MULTILABEL[:-1], 'multihot', '--target-format', 'multihot'), 'multihot'),
}


@pytest.fixture(scope='module')
def inputs(workdir):
    stats = workdir / 'stats.json'
    stats.write_text(json.dumps({'num_samples': 12, 'pos_counts': [6, 4, 2]}))
    # 4 validation images per class: 12, whole groups of --tta 2 in batches of 8.
    return {'folder': write_image_folder(workdir / 'data', per_class=4), 'wds': write_wds(workdir / 'wds'),
            'stats': stats}


@pytest.mark.parametrize('flag', FORMERLY_REFUSED)
def test_formerly_refused_flags_train(flag, inputs, tmp_path, monkeypatch):
    dest, extra, recorded = FORMERLY_REFUSED[flag]
    extra = [str(inputs['stats']) if word == 'STATS' else word for word in extra]
    recorded = str(inputs['stats']) if recorded == 'STATS' else recorded
    multilabel = '--task' in extra
    data = inputs['wds'] if multilabel else inputs['folder']
    model = 'naflexvit_base_patch16_gap' if '--naflex-loader' in extra else 'test_resnet'
    if flag == '--log-wandb':
        use_offline_wandb(monkeypatch, tmp_path / 'wandb-root')
    try:
        run_dir = train_in_process(tiny_args(data, tmp_path, 'run', *extra, model=model,
                                               num_classes=MULTILABEL_CLASSES if multilabel else 3))
    finally:
        if flag == '--log-wandb':
            wandb.teardown()
    assert [row['epoch'] for row in read_summary(run_dir)] == [0]
    assert yaml.safe_load((run_dir / 'args.yaml').read_text())[dest] == recorded


def test_the_table_holds_every_flag_once():
    assert len({dest for dest, _, _ in FORMERLY_REFUSED.values()}) == len(FORMERLY_REFUSED) == 16
    assert all(flag in extra for flag, (_, extra, _) in FORMERLY_REFUSED.items())
