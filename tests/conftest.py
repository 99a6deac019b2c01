"""Shared fixtures: small image folders written by the tests themselves, and an offline Hugging Face Hub (an empty
cache, no token, and a stand-in for HfApi whose uploads land in that cache as a download would)."""
import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, List, Optional

import huggingface_hub.constants as hf_constants
import numpy as np
import pytest
import torch
from PIL import Image

from timm_tfkd import SelfDistillLoss, TfKDSelfTask


def write_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 16, channels: int = 3,
                       splits=('train', 'validation'), seed: int = 0) -> Path:
    """Write ``root/<split>/class_<k>/<i>.png`` images whose class is visible (a per-class brightness pattern)."""
    rng = np.random.default_rng(seed)
    mode = 'L' if channels == 1 else 'RGB'
    for split in splits:
        for label in range(classes):
            folder = root / split / f'class_{label}'
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                base = np.zeros((size, size), dtype=np.float32)
                base[:, label * size // classes:(label + 1) * size // classes] = 200.0
                pixels = np.clip(base + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)
                if channels == 3:
                    pixels = np.stack([pixels, pixels[::-1], pixels.T], axis=-1)
                Image.fromarray(pixels, mode=mode).save(folder / f'{index}.png')
    return root


@pytest.fixture(autouse=True, scope='module')
def one_torch_thread():
    """Tiny models on a shared 2-core machine run many times faster on one thread than on two that contend (measured
    ten times slower with two), and runs in the same process stay comparable bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def workdir(request, tmp_path_factory) -> Path:
    """A folder shared by the tests of one module (its runs, data and exports), named after the module."""
    return tmp_path_factory.mktemp(request.module.__name__.replace('test_', ''))


@pytest.fixture(scope='module')
def data_dir(workdir) -> Path:
    """The module's 3-class, 16 px RGB image folder with train and validation splits (8 images per class)."""
    return write_image_folder(workdir / 'data')


def _detached_copy(batch):
    if isinstance(batch, dict):  # a NaFlex batch: patches, coordinates, valid mask
        return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch.detach().clone()


@pytest.fixture
def teacher_uses(monkeypatch) -> List[dict]:
    """Each training step of a self / kd task: the batch it got (``input``) and the teacher logits its loss was given
    (``teacher_logits``)."""
    seen: List[dict] = []
    real_forward, real_terms = TfKDSelfTask.forward, SelfDistillLoss.terms

    def forward(self, input, target):
        seen.append({'input': _detached_copy(input)})
        return real_forward(self, input, target)

    def terms(self, logits, teacher_logits, target, **kwargs):
        seen[-1]['teacher_logits'] = teacher_logits.detach().clone()
        return real_terms(self, logits, teacher_logits, target, **kwargs)

    monkeypatch.setattr(TfKDSelfTask, 'forward', forward)
    monkeypatch.setattr(SelfDistillLoss, 'terms', terms)
    return seen


@pytest.fixture(autouse=True)
def isolated_logging():
    """Entry points run in-process (the trainer's ``main``, ``timm-tfkd``) install their console handlers on the root
    logger, as they do in a fresh process; take them away again so that one test's handlers never print into the
    next test's stderr."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def use_offline_hub(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Point huggingface_hub at an empty cache under ``home``, offline, with no real token reachable.

    huggingface_hub reads these settings into module constants at import time, so both the environment and the
    constants are patched.

    Returns:
        The Hub cache folder.
    """
    cache = home / 'hub'
    cache.mkdir(parents=True)
    for name in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_OIDC_RESOURCE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HOME', str(home))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf_constants, 'HF_TOKEN_PATH', str(home / 'token'))
    monkeypatch.setattr(hf_constants, 'HF_STORED_TOKENS_PATH', str(home / 'stored_tokens'))
    return cache


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty offline Hub cache under tmp_path for one test (see :func:`use_offline_hub`)."""
    return use_offline_hub(monkeypatch, tmp_path / 'hf_home')


def publish_to_cache(cache: Path, repo_id: str, folder: Path, revision: str) -> str:
    """Lay a folder out as huggingface_hub caches a downloaded repo: refs/REV -> snapshots/COMMIT/files."""
    files = sorted(p for p in folder.iterdir())
    commit = hashlib.sha1(b''.join(p.read_bytes() for p in files)).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / 'refs').mkdir(parents=True, exist_ok=True)
    (repo / 'refs' / revision).write_text(commit)
    shutil.copytree(folder, repo / 'snapshots' / commit)
    return commit


class FakeHubApi:
    """Stands in for HfApi: records keyword calls; an upload lands in the local Hub cache as a download would."""

    def __init__(self, cache: Path, fail_with: Optional[Exception] = None):
        self.cache = cache
        self.fail_with = fail_with
        self.calls: List[tuple] = []
        self.uploaded_files: Optional[List[str]] = None

    def create_repo(self, **kwargs: Any) -> str:
        self.calls.append(('create_repo', kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs: Any) -> None:
        self.calls.append(('create_branch', kwargs))

    def upload_folder(self, **kwargs: Any) -> str:
        self.calls.append(('upload_folder', kwargs))
        if self.fail_with is not None:
            raise self.fail_with
        folder = Path(kwargs['folder_path'])
        self.uploaded_files = sorted(p.name for p in folder.iterdir())
        commit = publish_to_cache(self.cache, kwargs['repo_id'], folder, kwargs['revision'] or 'main')
        return f"https://huggingface.co/{kwargs['repo_id']}/commit/{commit}"
