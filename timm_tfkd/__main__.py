"""``python -m timm_tfkd``: the ``timm-tfkd`` command."""
import sys

from .cli import main

sys.exit(main())
