"""examples/recipes: every YAML is a valid trainer config, names the run it needs first, and schedules as stated."""
import re
from pathlib import Path
from typing import Dict

import pytest
import torch
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from timm_tfkd.train.config import parse_args
from timm_tfkd.train.policy import check_supported

RECIPES_DIR = Path(__file__).resolve().parents[1] / 'examples' / 'recipes'
RECIPES = sorted(RECIPES_DIR.rglob('*.yaml'))
CIFAR_MODELS = ('resnet18', 'mobilenetv2', 'shufflenetv2')
CIFAR_METHODS = ('baseline', 'ls', 'reg_official', 'reg_paper', 'self', 'kd', 're_kd', 'de_kd')


def _args(path: Path):
    return parse_args(['-c', str(path)]).args


def _by_run_folder() -> Dict[str, object]:
    """Recipe arguments keyed by the run folder they write, ``output/experiment``."""
    return {f'{args.output}/{args.experiment}': args for args in map(_args, RECIPES)}


def test_every_model_and_method_has_a_recipe():
    names = {path.relative_to(RECIPES_DIR).as_posix() for path in RECIPES}
    expected = {f'cifar100/{m}_{k}.yaml' for m in CIFAR_MODELS for k in CIFAR_METHODS}
    expected |= {f'imagenet/{m}_{k}.yaml' for m in ('resnet18', 'resnet50') for k in ('baseline', 'reg', 'self')}
    assert expected <= names


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_recipe_parses_and_is_supported(path):
    args = _args(path)
    check_supported(args)
    assert args.experiment and args.output


@pytest.mark.parametrize('path', RECIPES, ids=lambda p: p.relative_to(RECIPES_DIR).as_posix())
def test_recipe_header_gives_command_and_published_number(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith('#'):
            break
        header.append(line)
    text = '\n'.join(header)
    run = re.search(r'^# Run: +(.*)$', text, flags=re.M)
    assert run and f'-c examples/recipes/{path.relative_to(RECIPES_DIR).as_posix()}' in run.group(1)
    assert re.search(r'^# Published: +\S', text, flags=re.M)


def test_experiment_names_are_unique():
    folders = [f'{args.output}/{args.experiment}' for args in map(_args, RECIPES)]
    assert len(folders) == len(set(folders))


def test_every_teacher_checkpoint_is_written_by_a_recipe():
    runs = _by_run_folder()
    for path in RECIPES:
        args = _args(path)
        source = args.tfkd_teacher_checkpoint
        if not source or source.startswith('pretrained'):
            continue
        folder, _, file_name = source.rpartition('/')
        assert folder in runs, f'{path.name}: no recipe writes {folder}'
        teacher = runs[folder]
        milestone = re.fullmatch(r'milestone-(\d+)\.pth\.tar', file_name)
        assert file_name == 'last.pth.tar' or (milestone and int(milestone.group(1)) in (teacher.save_epochs or ())), \
            f'{path.name}: {folder} does not keep {file_name}'
        assert (args.tfkd_teacher_model or args.model) == teacher.model, path.name


def test_cifar_schedule_warms_up_one_epoch_then_multiplies_by_0_2_at_60_120_160():
    args = _args(RECIPES_DIR / 'cifar100' / 'resnet18_baseline.yaml')
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    updates_per_epoch = 391  # 50,000 images / batch 128
    scheduler, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    assert epochs == 200

    def lr_at(epoch: float) -> float:
        scheduler.step_update(int(epoch * updates_per_epoch))
        return optimizer.param_groups[0]['lr']

    assert lr_at(0) < 1e-4 and lr_at(0.5) == pytest.approx(0.05, rel=0.01)
    for epoch, lr in ((1, 0.1), (59.9, 0.1), (60, 0.02), (120, 0.004), (160, 0.0008), (199.9, 0.0008)):
        assert lr_at(epoch) == pytest.approx(lr), epoch
