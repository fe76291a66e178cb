"""Shared test setup: never reach a model hub, keep Lance quiet, seed everything."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LANCE_LOG", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Encoders with dtype "auto" run float32 in tests on every machine (bf16 where the CPU has bf16 units
# would make results depend on the CPU); the reduced-precision paths have tests of their own.
os.environ.setdefault("FUSEMIX_ENCODER_DTYPE", "float32")


import signal  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_process_state():
    """Each test starts without state an earlier one may have left in this process: Dagster's
    current definitions-state storage (a context variable an instance sets on `with instance:`, which
    points at a dead instance once that one is gone) and an ignored or blocked SIGTERM (inherited by
    every subprocess a test starts, which would then never stop on SIGTERM)."""
    from dagster._core.storage.defs_state.base import _current_storage

    token = _current_storage.set(None)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
    yield
    try:
        _current_storage.reset(token)
    except ValueError:  # set in another context (a fixture of wider scope): leave it cleared
        _current_storage.set(None)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run wherever a CUDA device is present (in `make test` too) and are skipped,
    with the reason, elsewhere."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; torch.cuda.is_available() is False here")
    for item in gpu_tests:
        item.add_marker(skip)
