"""Jobs behind the CLI: ``eekernels sample`` (the main job) and its multi-process runner."""
