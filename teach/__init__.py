"""The teaching kit (python teach/run.py --help): student copies with functions blanked, a grader that runs each
student's function in a process of its own (sandbox.py, child.py, wire.py, referee.py), exercise 2's hidden mutants
(mutants.py), and the measurements students run (probe.py). No core script imports this folder."""
