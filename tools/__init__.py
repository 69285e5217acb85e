"""Commands that no core script imports: converters and scorers around the method (python tools/NAME.py --help)."""
