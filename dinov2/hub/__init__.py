"""torch.hub entry points (see hubconf.py at the repository root)."""
