"""Launchers: submit training (dinov2/run/train) and evaluation (dinov2/run/eval) to SLURM via submitit.

The shared part is dinov2.run.submit (options, sbatch parameters, the distributed task, requeue on
preemption); scripts/slurm_local_cluster.sh starts a single-node SLURM cluster to try them locally.
"""
