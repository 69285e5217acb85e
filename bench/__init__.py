"""Speed and memory per phase, against TRL, and the 3B step simulated under fake tensors (python bench/run.py
--help): for whoever changes the training step. No core script imports this folder."""
