"""Helpers shared by the tests (not tests themselves): references, run directories, training set-ups."""
