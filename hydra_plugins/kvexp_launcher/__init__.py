"""kvexp's Hydra launcher plugin: hydra/launcher=kvexp_gpus (kvexp/launcher.py does the work)."""
