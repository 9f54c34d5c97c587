"""Helpers every stage may import, each written once:

- `files`: atomic file writes (`atomic_write`, `atomic_path`, `atomic_torch_save`);
- `device`: which device a tool runs on (`resolve_device`) and its autocast;
- `utils`: seeding (`fix_random_seeds`);
- `distributed`: rank, world size and the process group, read from torch.distributed;
- `config`: the training config (defaults, overrides, validation);
- `dataclass_cli`: command-line flags generated from a config dataclass;
- `lazy`: package attributes imported on first use;
- `logging`, `signals`, `notebooks`.
"""
