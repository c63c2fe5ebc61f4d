"""Predict before measuring: per-layer profiles, memory and time models, plan search.

Pure Python (no torch): the orchestrator imports it for ``charllm plan --predict``.
"""
