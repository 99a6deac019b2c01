"""Smoke test of the overhead benchmark: it runs end to end and prints every table. No timing is checked."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TITLES = ('Loss only: forward + backward', 'Training step through timm tasks')
HEADERS = ('configuration', 'median ms', 'IQR ms', 'ratio', 'img/s', 'peak RSS MiB (process)', 'machine:')
CONFIGURATIONS = (
    'F.cross_entropy (indices)', 'timm SoftTargetCrossEntropy (soft)', 'reg reference construction (indices)',
    'reg official (indices)', 'reg official (soft)', 'reg paper (indices)', 'reg paper (soft)',
    'self paper (indices)', 'label smoothing (indices)',
    'CE (timm ClassificationTask)', 'reg paper (TfKDRegTask)', 'self (TfKDSelfTask), teacher plain',
    'self, teacher channels_last', 'self, teacher fuse_bn', 'self, teacher channels_last+fuse_bn',
    'self, teacher bfloat16', 'timm LogitDistillationTask', 'teacher forward only (plain fp32)',
    'floor for self: CE + teacher forward',
)


@pytest.mark.timeout(900)  # beyond the subprocess's own 600 s, so that one reports first
def test_quick_run_prints_every_table_and_configuration(tmp_path):
    markdown = tmp_path / 'overhead.md'
    result = subprocess.run(
        [sys.executable, '-m', 'benchmarks.overhead', '--quick', '--section', 'all', '--markdown', str(markdown)],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for text in TITLES + HEADERS + CONFIGURATIONS:
        assert text in result.stdout, f'{text!r} missing from the output:\n{result.stdout}'
    written = markdown.read_text()
    for text in TITLES + CONFIGURATIONS:
        assert text in written, f'{text!r} missing from the markdown file'
