"""Analysis of dilation patterns: reach over stacked layers (reach.py) and pictures (viz.py)."""
