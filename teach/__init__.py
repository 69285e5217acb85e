"""The teaching kit (python teach/run.py --help): student copies with functions blanked, a grader, and the
measurements students run (probe.py). No core script imports this folder."""
