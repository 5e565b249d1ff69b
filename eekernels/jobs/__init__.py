"""Jobs behind the CLI, one module per command: ``sample`` (and its multi-process runner ``distributed``),
``bench`` and ``finetune``."""
