"""Run configs for `python -m vit_jax.main --config=configs/<name>.py[:args]`.

`common` declares every key (locked); `default` is the offline main job (the command line's
default, found as the module `configs.default`, so it is installed with the package);
`pretrain` and `finetune` are the paper's recipes.
"""
