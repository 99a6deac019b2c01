"""README.md stays true: its Python example is the file the suite runs, its flag lists match the code."""
import re
import subprocess
import sys
from pathlib import Path

from timm_tfkd.train.flags import create_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()


def test_python_example_is_examples_python_api_and_runs():
    blocks = re.findall(r'```python\n(.*?)```', README, flags=re.S)
    example = (ROOT / 'examples' / 'python_api.py').read_text()
    assert example in blocks
    result = subprocess.run([sys.executable, str(ROOT / 'examples' / 'python_api.py')], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert 'official reg (ResNet-18 setting) = 1.00 x label smoothing 0.100' in result.stdout


def test_first_commands_are_demo_and_test():
    first_block = re.search(r'```bash\n(.*?)```', README, flags=re.S).group(1)
    assert [line.split('#')[0].strip() for line in first_block.strip().splitlines()] == ['make demo', 'make test']


def test_every_tfkd_flag_is_documented():
    for action in create_parser()._actions:
        for option in action.option_strings:
            if option.startswith('--tfkd-'):
                assert option in README, option


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, '-m', 'timm_tfkd', '--version'], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith('timm-tfkd '), result.stderr


def test_readme_links_resolve_outside_the_repository():
    """The wheel's metadata carries README: a link to a file of the repository would be dead on PyPI."""
    links = re.findall(r'\]\(([^)]+)\)', README)
    assert all(link.startswith(('http://', 'https://', '#')) for link in links), links
