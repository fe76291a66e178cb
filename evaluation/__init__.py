"""Evaluation of fused models: retrieval metrics, baselines, ablation reports and plots.

May import `fusion`; never an orchestration or storage library.
"""
