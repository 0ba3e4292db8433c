"""Deployable half of sixbit-tune: load a policy JSON and run DMPQ + Temporal Delta Cache inside a diffusers model.

Must stay light: importing it pulls in no optuna, duckdb, streamlit or plotly (a test guards this).
"""
