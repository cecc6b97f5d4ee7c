"""Orchestration of experiments: runs, the xeno-learning study, and its report."""
