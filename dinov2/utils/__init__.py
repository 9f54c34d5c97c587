"""Helpers every stage may import, each written once:

- `files`: atomic file writes (`atomic_write`, `atomic_path`, `atomic_torch_save`);
- `device`: which device a tool runs on (`resolve_device`) and its autocast;
- `utils`: seeding (`fix_random_seeds`, `seed_host_rngs`);
- `distributed`: rank, world size and the process group, read from torch.distributed (and the
  launcher's variables before the group exists);
- `dtypes`: the names of compute dtypes in configs (`DTYPES`, `dtype_from_name`);
- `knn`: cosine k-NN search and votes, shared by the online monitor and the evaluation suite;
- `config`: the training config (defaults, overrides, validation);
- `dataclass_cli`: command-line flags generated from a config dataclass;
- `lazy`: package attributes imported on first use;
- `logging`, `signals`, `notebooks`.
"""
