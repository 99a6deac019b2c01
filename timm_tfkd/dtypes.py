"""Names of the floating-point dtypes the command lines accept (``--model-dtype``, ``--tfkd-teacher-dtype``, ...)."""
import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
