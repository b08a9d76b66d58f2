"""Measuring synthetic data (scripts/evaluate_synthetic.py): memorisation, fidelity, downstream
utility, and the report."""
