"""The pure core: sampling with log-probs, losses, advantages, reward maps.

Modules here import torch, numpy, PIL and diffusers only: no I/O adapters
(mlflow, kfp, dvc, great_expectations). ``tests/core/test_purity.py`` enforces it.
"""
