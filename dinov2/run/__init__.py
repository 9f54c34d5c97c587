"""Launchers and tools on top of the stages: SLURM training (dinov2/run/train) and evaluation
(dinov2/run/eval) through submitit, the demo (demo.py, demo_classifier.py) and `dinov2-serve`
(serve.py).

The shared launcher part is dinov2.run.submit (options, sbatch parameters, the distributed task,
requeue on preemption) with dinov2.run.job_env (the torchrun variables each SLURM task sets);
scripts/slurm_local_cluster.sh starts a single-node SLURM cluster to try them locally.
"""
