"""Tuning (`--tune`): the search spaces, the held-out selection split, the Optuna studies of the two stages
and their trials, and what tuning adds to the results."""
