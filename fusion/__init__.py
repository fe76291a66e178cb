"""FuseMix core: frozen unimodal encoders, small adapters, latent mixup and contrastive training.

Plain PyTorch and NumPy. Nothing here imports an orchestration or storage library
(dagster, lance, mlflow, duckdb); the pipeline in `pipelines/` and `assets/` wraps it.
"""
