"""Data tools behind the ``timm-tfkd`` command line (e.g. ``timm-tfkd fashion-mnist``); not needed for training."""
