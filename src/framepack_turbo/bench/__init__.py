"""`framepack bench`: speed, peak memory and fidelity of configurations against the baseline, in one run."""
