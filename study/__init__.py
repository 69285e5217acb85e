"""The small reproduction on the CPU and its learning curve (python study/run.py --help): for researchers who want
to know what OP-GRPO does at 135M. No core script imports this folder."""
