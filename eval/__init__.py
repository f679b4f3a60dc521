"""Evaluation: generation, the five preference metrics, A/B win rates and reports."""
