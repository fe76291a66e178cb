"""Tiny, randomly initialised models saved to a folder exactly as a user's model would be, offline.

Each `make_tiny_*` builds a seeded model (hidden size ~32) with its tokenizer or feature-extractor
config, saves it with `save_pretrained` and returns the folder, so tests and the pipeline tests load
them through the same `from_pretrained` code paths that real models take. `write_tiny_registry`
writes an encoders.yaml with `tiny-text`, `tiny-image` and `tiny-audio` pointing at those folders.

Nothing here reaches a model hub: tokenizers are built from vocabularies written here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import transformers
import yaml

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# A small WordPiece vocabulary: enough real words that paraphrase-style test sentences tokenise into
# different ids, plus single letters and ##-suffixes so that any lowercase ASCII word tokenises.
_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "to",
    "in",
    "on",
    "is",
    "are",
    "was",
    "with",
    "for",
    "at",
    "by",
    "from",
    "this",
    "that",
    "it",
    "as",
    "be",
    "cat",
    "cats",
    "dog",
    "dogs",
    "bird",
    "car",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "sits",
    "sat",
    "runs",
    "ran",
    "flies",
    "over",
    "under",
    "table",
    "sofa",
    "street",
    "sky",
    "park",
    "man",
    "woman",
    "child",
    "plays",
    "playing",
    "ball",
    "music",
    "piano",
    "guitar",
    "sound",
    "loud",
    "quiet",
    "photo",
    "picture",
    "drawing",
    "of",
    "one",
    "two",
    "three",
]
_LETTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
_PUNCT = list(".,!?'\"-:;()")
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def _quiet(fn):
    """Hides transformers' "Writing model shards" bar while a tiny model is saved."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()

    return wrapper


def tiny_bert_vocab() -> list[str]:
    """The WordPiece vocabulary of the tiny BERT (specials first, so [PAD] is id 0)."""
    vocab = BERT_SPECIALS + _PUNCT + _LETTERS + [f"##{c}" for c in _LETTERS]
    for word in _WORDS:
        if word not in vocab:
            vocab.append(word)
    return vocab


@_quiet
def make_tiny_bert(directory: str | Path, seed: int = 0, st_pooling: str | None = None) -> Path:
    """A 2-layer BERT (hidden 32) with a WordPiece tokenizer, saved to `directory`.

    st_pooling: "mean" or "cls" adds a sentence-transformers `1_Pooling/config.json` (and
    `modules.json`), as sentence-transformers checkpoints carry.
    """
    from transformers import BertConfig, BertModel, BertTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(tiny_bert_vocab()) + "\n", encoding="utf-8")
    if _TRANSFORMERS_MAJOR >= 5:
        vocab = {tok: i for i, tok in enumerate(tiny_bert_vocab())}
        tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    else:  # transformers 4.x builds from the vocab file
        tokenizer = BertTokenizer(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=64)
    tokenizer.save_pretrained(out)
    _seed(seed)
    config = BertConfig(
        vocab_size=len(tiny_bert_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    BertModel(config).eval().save_pretrained(out)
    if st_pooling is not None:
        if st_pooling not in ("mean", "cls"):
            raise ValueError(f"st_pooling must be 'mean' or 'cls', got {st_pooling!r}")
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {
                    "word_embedding_dimension": 32,
                    "pooling_mode_cls_token": st_pooling == "cls",
                    "pooling_mode_mean_tokens": st_pooling == "mean",
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                }
            )
        )
        (out / "modules.json").write_text(
            json.dumps(
                [
                    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                    {
                        "idx": 1,
                        "name": "1",
                        "path": "1_Pooling",
                        "type": "sentence_transformers.models.Pooling",
                    },
                ]
            )
        )
        (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 48}))
    return out


@_quiet
def make_tiny_vit(directory: str | Path, seed: int = 0, with_processor: bool = True) -> Path:
    """A 2-layer ViT (hidden 32, 32x32 images, 8x8 patches) with a pooler, saved to `directory`.

    with_processor=False leaves out preprocessor_config.json so the loader falls back to the spec's
    image_size/mean/std.
    """
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )
    ViTModel(config, add_pooling_layer=True).eval().save_pretrained(out)
    if with_processor:
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@_quiet
def make_tiny_whisper(directory: str | Path, seed: int = 0) -> Path:
    """A Whisper with a 2-layer encoder (d_model 32, the real 80 mel bins and 30-s window), saved with
    its WhisperFeatureExtractor config (16 kHz)."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
    WhisperModel(config).eval().save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80, sampling_rate=16000).save_pretrained(out)
    return out


def _byte_level_vocab() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: every byte is a token (GPT-2's byte->unicode map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for b in range(256):
        vocab[mapping[b]] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return vocab


@_quiet
def make_tiny_clap(directory: str | Path, seed: int = 0) -> Path:
    """A tiny CLAP (RoBERTa text tower, HTSAT audio tower, 32-d projection) with a byte-level BPE
    tokenizer and a ClapFeatureExtractor (48 kHz, 10-s window), saved to `directory`."""
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapProcessor,
        ClapTextConfig,
        RobertaTokenizer,
    )

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _byte_level_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    if _TRANSFORMERS_MAJOR >= 5:
        tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=64)
    else:  # transformers 4.x builds from the files
        tokenizer = RobertaTokenizer(
            vocab_file=str(out / "vocab.json"), merges_file=str(out / "merges.txt"), model_max_length=64
        )
    feature_extractor = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, max_length_s=10)
    ClapProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out)
    _seed(seed)
    text_config = ClapTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        projection_dim=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    audio_config = ClapAudioConfig(
        spec_size=256,
        num_mel_bins=64,
        patch_embeds_hidden_size=16,  # x2 per stage: the last stage must be hidden_size
        hidden_size=32,
        depths=[1, 1],
        num_attention_heads=[1, 2],
        window_size=8,
        projection_dim=32,
        enable_fusion=False,
    )
    config = ClapConfig(
        text_config=text_config.to_dict(), audio_config=audio_config.to_dict(), projection_dim=32
    )
    ClapModel(config).eval().save_pretrained(out)
    return out


def write_tiny_registry(directory: str | Path, seed: int = 0) -> Path:
    """Builds the tiny BERT, ViT and Whisper under `directory` and writes `directory/encoders.yaml`
    with `tiny-text`, `tiny-image` and `tiny-audio` (source hf, local folders). Returns the YAML path."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    text_dir = make_tiny_bert(root / "tiny-bert", seed=seed)
    image_dir = make_tiny_vit(root / "tiny-vit", seed=seed)
    audio_dir = make_tiny_whisper(root / "tiny-whisper", seed=seed)
    registry = {
        "encoders": {
            "tiny-text": {
                "modality": "text",
                "source": "hf",
                "model": str(text_dir),
                "pooling": "mean",
                "batch_size": 8,
            },
            "tiny-image": {
                "modality": "image",
                "source": "hf",
                "model": str(image_dir),
                "pooling": "cls",
                "batch_size": 8,
            },
            "tiny-audio": {
                "modality": "audio",
                "source": "hf",
                "model": str(audio_dir),
                "pooling": "mean",
                "batch_size": 4,
                "options": {"short_clip": True},
            },
        }
    }
    path = root / "encoders.yaml"
    path.write_text(yaml.safe_dump(registry, sort_keys=False), encoding="utf-8")
    return path
