"""Streamlit dashboard, imported as ``sixbit_tune.dashboard``."""
