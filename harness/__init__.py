"""What the scripts share that is not the method, by role: data (situations and their checks), models (loading
and fingerprints), runs (folders, atomic writes, checkpoints), cli (flags and one-line errors) and report (plots
and tables). It imports none of the scripts; a reader of the method may skip it."""
