"""The training application built on the deltaft library.

Configuration, models, data, the run directory and checkpoints, distributed training, figures,
and the operations that ``deltaft`` runs (train, attention, eval, compare, demo, split) as plain
functions. It imports the core library (``deltaft``, ``deltaft.attention``,
``deltaft.regularizers``) and never the command line (``deltaft.cli``).
"""
