"""Evaluation of (merged) models: lm-eval runs, offline code scoring, and the AIM comparison report.

`evaluation.runner.evaluate` runs benchmarks in process, `evaluation.results.save_results`
writes the run's JSON, and `evaluation.report.make_report` builds the table, HV gain and plot.
"""
