#!/usr/bin/env python3
"""Train any timm model with Teacher-free Knowledge Distillation.

Accepts every flag of timm's train.py plus the "Tf-KD parameters" group; see README.md. Same as the installed
``timm-tfkd-train`` command; works with ``torchrun`` for several processes and nodes.
"""
import sys

from timm_tfkd.train.main import main

if __name__ == '__main__':
    sys.exit(main())
