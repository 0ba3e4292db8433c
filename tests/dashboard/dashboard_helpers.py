"""Constants and small helpers of the dashboard tests (a plain module: tests/ has no packages)."""

from __future__ import annotations

MODEL = "tiny:wan"
PROMPTS = ("a red square moving left", "a blue circle moving right")
STEPS = 4
TRIALS = 4
PAGES = ("runs", "sensitivity", "predictor", "temporal", "search", "policy", "gpus")
