"""What a core script imports only when a flag asks for it: --resume (resume.py), --lora-rank (lora.py), bfloat16
weights (precision.py), sim_train's --judge MODEL (judge.py), eval_nli's --answers FILE (answers.py)."""
