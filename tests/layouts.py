"""Writers of the other checkpoint layouts, from a tiny official checkpoint.

Each writer renames the official tensors the way that project's converter does, written here
from its published mapping and independently of the package's own renaming:

- Hugging Face transformers: `convert_voxtral_realtime_weights_to_hf.py` (STATE_DICT_MAPPING,
  `permute_for_rope` on the query and key rows, `lm_head` a copy of the embedding), saved as
  `audio_tower.*`, `multi_modal_projector.*`, `language_model.model.*` (transformers 4) or
  `model.audio_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`,
  `lm_head.weight` (transformers 5); config.json with `text_config` and `audio_config`.
- voxmlx: `encoder.conv1/2`, `encoder.layers.N.attention.{q,k,v,o}_proj`, `attn_norm`,
  `mlp.{gate,down,up}_proj`, `adapter.w_in/w_out`, `language_model.embed_tokens`,
  `language_model.layers.N.ada_norm.linear_in/out`; config.json is params.json (plus
  `quantization`); quantized: every linear layer and the embedding whose input divides the group.
- mlx-audio: `encoder.conv_layers_{i}_conv.conv`, `encoder.transformer_layers.N.feed_forward_w1`,
  `encoder.transformer_norm`, `encoder.audio_language_projection_{0,2}`,
  `decoder.tok_embeddings`, `decoder.layers.N.ada_rms_norm_t_cond.ada_down/ada_up`;
  config.json with `decoder` and `encoder_args`; quantized: its predicate skips norms, the
  ada-norm, the embedding, the conv stem and the adapter.

Conv kernels are [out, in, k] in the transformers layout and [out, k, in] in both MLX ones.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np

P = "mm_streams_embeddings.embedding_module."
E = P + "whisper_encoder."


def official(src: Path) -> dict[str, mx.array]:
    """The official tensors as float32."""
    return {k: v.astype(mx.float32) for k, v in mx.load(str(src / "consolidated.safetensors")).items()}


def _params(src: Path) -> dict:
    return json.loads((src / "params.json").read_text())


def _rename(name: str, table: list[tuple[str, str]]) -> str:
    for pattern, replacement in table:
        new, n = re.subn(f"^{pattern}$", replacement, name)
        if n:
            return new
    raise KeyError(name)


# --- Hugging Face transformers ------------------------------------------------------------

_HF = [
    (r"layers\.(\d+)\.attention_norm\.weight", r"LM.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"LM.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.weight", r"LM.layers.\1.self_attn.\2_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"LM.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"LM.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"LM.layers.\1.mlp.up_proj.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.0\.weight", r"LM.layers.\1.ada_rms_norm.linear1.weight"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.2\.weight", r"LM.layers.\1.ada_rms_norm.linear2.weight"),
    (r"norm\.weight", r"LM.norm.weight"),
    (re.escape(P) + r"tok_embeddings\.weight", r"LM.embed_tokens.weight"),
    (re.escape(E) + r"conv_layers\.0\.conv\.(weight|bias)", r"AT.embedder.conv1.\1"),
    (re.escape(E) + r"conv_layers\.1\.conv\.(weight|bias)", r"AT.embedder.conv2.\1"),
    (re.escape(E) + r"transformer\.norm\.weight", r"AT.norm.weight"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.attention\.w([qkv])\.(weight|bias)", r"AT.layers.\1.self_attn.\2_proj.\3"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.attention\.wo\.(weight|bias)", r"AT.layers.\1.self_attn.o_proj.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.attention_norm\.weight", r"AT.layers.\1.self_attn_layer_norm.weight"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.ffn_norm\.weight", r"AT.layers.\1.final_layer_norm.weight"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.feed_forward\.w1\.(weight|bias)", r"AT.layers.\1.mlp.gate_proj.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.feed_forward\.w2\.(weight|bias)", r"AT.layers.\1.mlp.down_proj.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.feed_forward\.w3\.(weight|bias)", r"AT.layers.\1.mlp.up_proj.\2"),
    (re.escape(P) + r"audio_language_projection\.0\.weight", r"MMP.linear_1.weight"),
    (re.escape(P) + r"audio_language_projection\.2\.weight", r"MMP.linear_2.weight"),
]


def permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' permutation: per head, interleaved pairs -> two halves (rows; weights or biases)."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def write_transformers(src: Path, dst: Path, version: int = 4, shards: int = 2) -> Path:
    """The checkpoint as transformers' conversion script saves it (sharded, with an index)."""
    params = _params(src)
    enc = params["multimodal"]["whisper_model_args"]["encoder_args"]
    prefixes = ({"LM": "language_model.model", "AT": "audio_tower", "MMP": "multi_modal_projector"} if version == 4 else
                {"LM": "model.language_model", "AT": "model.audio_tower", "MMP": "model.multi_modal_projector"})
    tensors = {}
    for name, w in official(src).items():
        new = _rename(name, _HF)
        head, rest = new.split(".", 1)
        new = f"{prefixes[head]}.{rest}"
        a = np.array(w)
        if ".self_attn.q_proj." in new or ".self_attn.k_proj." in new:
            audio = new.startswith(prefixes["AT"])
            heads = (enc["n_heads"] if audio else params["n_heads"]) if ".q_proj." in new else (
                enc["n_heads"] if audio else params["n_kv_heads"])
            a = permute_for_rope(a, heads)
        tensors[new] = mx.array(a).astype(mx.bfloat16)
    embed = tensors[prefixes["LM"] + ".embed_tokens.weight"]
    tensors["language_model.lm_head.weight" if version == 4 else "lm_head.weight"] = embed
    rope = {"rope_theta": params["rope_theta"], "rope_type": "default"}
    config = {
        "architectures": ["VoxtralRealtimeForConditionalGeneration"],
        "model_type": "voxtral_realtime",
        "audio_config": {
            "model_type": "voxtral_realtime_encoder", "hidden_size": enc["dim"], "intermediate_size": enc["hidden_dim"],
            "num_hidden_layers": enc["n_layers"], "num_attention_heads": enc["n_heads"],
            "num_key_value_heads": enc["n_heads"], "head_dim": enc["head_dim"],
            "num_mel_bins": enc["audio_encoding_args"]["num_mel_bins"], "rms_norm_eps": enc["norm_eps"],
            "sliding_window": enc["sliding_window"], "rope_parameters": {**rope, "rope_theta": enc["rope_theta"]},
            "vocab_size": params["vocab_size"], "activation_function": "gelu", "hidden_act": "silu",
        },
        "text_config": {
            "model_type": "voxtral_realtime_text", "hidden_size": params["dim"], "intermediate_size": params["hidden_dim"],
            "num_hidden_layers": params["n_layers"], "num_attention_heads": params["n_heads"],
            "num_key_value_heads": params["n_kv_heads"], "head_dim": params["head_dim"],
            "vocab_size": params["vocab_size"], "rms_norm_eps": params["norm_eps"],
            "sliding_window": params["sliding_window"], "rope_parameters": rope, "tie_word_embeddings": True,
            "max_position_embeddings": 131072, "bos_token_id": 1, "eos_token_id": 2,
        },
        "downsample_factor": params["multimodal"]["whisper_model_args"]["downsample_args"]["downsample_factor"],
        "audio_length_per_tok": 8,
        "default_num_delay_tokens": 6,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {"feature_extractor_type": "VoxtralRealtimeFeatureExtractor", "feature_size": 128,
                    "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "win_length": 400,
                    "global_log_mel_max": 1.5}
    (dst / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    shutil.copyfile(src / "tekken.json", dst / "tekken.json")
    names = sorted(tensors)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, file in enumerate(files):
        part = names[i::shards]
        mx.save_safetensors(str(dst / file), {n: tensors[n] for n in part}, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


# --- voxmlx and mlx-audio -----------------------------------------------------------------

_VOXMLX = [
    (re.escape(E) + r"conv_layers\.0\.conv\.(\w+)", r"encoder.conv1.\1"),
    (re.escape(E) + r"conv_layers\.1\.conv\.(\w+)", r"encoder.conv2.\1"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.attention\.w([qkvo])\.(\w+)", r"encoder.layers.\1.attention.\2_proj.\3"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.attention_norm\.(\w+)", r"encoder.layers.\1.attn_norm.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.feed_forward\.w1\.(\w+)", r"encoder.layers.\1.mlp.gate_proj.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.feed_forward\.w2\.(\w+)", r"encoder.layers.\1.mlp.down_proj.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.feed_forward\.w3\.(\w+)", r"encoder.layers.\1.mlp.up_proj.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.ffn_norm\.(\w+)", r"encoder.layers.\1.ffn_norm.\2"),
    (re.escape(E) + r"transformer\.norm\.(\w+)", r"encoder.norm.\1"),
    (re.escape(P) + r"audio_language_projection\.0\.(\w+)", r"adapter.w_in.\1"),
    (re.escape(P) + r"audio_language_projection\.2\.(\w+)", r"adapter.w_out.\1"),
    (re.escape(P) + r"tok_embeddings\.(\w+)", r"language_model.embed_tokens.\1"),
    (r"layers\.(\d+)\.attention\.w([qkvo])\.(\w+)", r"language_model.layers.\1.attention.\2_proj.\3"),
    (r"layers\.(\d+)\.attention_norm\.(\w+)", r"language_model.layers.\1.attn_norm.\2"),
    (r"layers\.(\d+)\.feed_forward\.w1\.(\w+)", r"language_model.layers.\1.mlp.gate_proj.\2"),
    (r"layers\.(\d+)\.feed_forward\.w2\.(\w+)", r"language_model.layers.\1.mlp.down_proj.\2"),
    (r"layers\.(\d+)\.feed_forward\.w3\.(\w+)", r"language_model.layers.\1.mlp.up_proj.\2"),
    (r"layers\.(\d+)\.ffn_norm\.(\w+)", r"language_model.layers.\1.ffn_norm.\2"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.0\.(\w+)", r"language_model.layers.\1.ada_norm.linear_in.\2"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.2\.(\w+)", r"language_model.layers.\1.ada_norm.linear_out.\2"),
    (r"norm\.(\w+)", r"language_model.norm.\1"),
]

_MLX_AUDIO = [
    (re.escape(P) + r"tok_embeddings\.(\w+)", r"decoder.tok_embeddings.\1"),
    (r"norm\.(\w+)", r"decoder.norm.\1"),
    (re.escape(E) + r"conv_layers\.(\d)\.conv\.(\w+)", r"encoder.conv_layers_\1_conv.conv.\2"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.feed_forward\.w(\d)\.(\w+)",
     r"encoder.transformer_layers.\1.feed_forward_w\2.\3"),
    (re.escape(E) + r"transformer\.layers\.(\d+)\.(.+)", r"encoder.transformer_layers.\1.\2"),
    (re.escape(E) + r"transformer\.norm\.(\w+)", r"encoder.transformer_norm.\1"),
    (re.escape(P) + r"audio_language_projection\.(\d)\.(\w+)", r"encoder.audio_language_projection_\1.\2"),
    (r"layers\.(\d+)\.feed_forward\.w(\d)\.(\w+)", r"decoder.layers.\1.feed_forward_w\2.\3"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.0\.(\w+)", r"decoder.layers.\1.ada_rms_norm_t_cond.ada_down.\2"),
    (r"layers\.(\d+)\.ada_rms_norm_t_cond\.2\.(\w+)", r"decoder.layers.\1.ada_rms_norm_t_cond.ada_up.\2"),
    (r"layers\.(\d+)\.(.+)", r"decoder.layers.\1.\2"),
]

_MATRICES = re.compile(r".*(attention\.w[qkvo]|feed_forward\.w\d|audio_language_projection\.\d|ada_rms_norm_t_cond\.\d|"
                       r"tok_embeddings)\.weight$")


def voxmlx_quantized(name: str, w: mx.array, group_size: int) -> bool:
    """voxmlx quantizes every module with `to_quantized` (Linear, Embedding) whose input divides the group."""
    return bool(_MATRICES.match(name)) and w.shape[-1] % group_size == 0


def mlx_audio_quantized(name: str, w: mx.array, group_size: int) -> bool:
    """mlx-audio's predicate skips norms, the ada-norm, the embedding, the conv stem and the adapter."""
    skip = ("norm", "ada_rms_norm", "tok_embeddings", "conv_layers", "audio_language_projection")
    return bool(_MATRICES.match(name)) and not any(s in name for s in skip)


def write_mlx(src: Path, dst: Path, layout: str, quantization: dict | None = None,
              extra: dict[str, mx.array] | None = None) -> Path:
    """A voxmlx or mlx-audio model directory (config.json, model.safetensors, tekken.json)."""
    params = _params(src)
    table, predicate = (_VOXMLX, voxmlx_quantized) if layout == "voxmlx" else (_MLX_AUDIO, mlx_audio_quantized)
    tensors = {}
    for name, w in official(src).items():
        if w.ndim == 3:
            w = w.swapaxes(1, 2)  # MLX conv kernels
        new = _rename(name, table)
        if quantization and predicate(name, w, quantization["group_size"]):
            q, scales, biases = mx.quantize(w, quantization["group_size"], quantization["bits"])
            stem = new.rsplit(".", 1)[0]
            tensors.update({new: q, f"{stem}.scales": scales, f"{stem}.biases": biases})
        elif layout == "mlx-audio" and ("norm" in name or "bias" in name):
            tensors[new] = w  # mlx-audio keeps norms and biases in float32
        else:
            tensors[new] = w.astype(mx.bfloat16)
    tensors.update(extra or {})
    if layout == "voxmlx":
        config = dict(params)
    else:
        whisper = params["multimodal"]["whisper_model_args"]
        decoder_keys = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "norm_eps",
                        "rope_theta", "sliding_window", "tied_embeddings", "ada_rms_norm_t_cond", "ada_rms_norm_t_cond_dim")
        config = {"model_type": "voxtral_realtime",
                  "decoder": {k: params[k] for k in decoder_keys if k in params},
                  "encoder_args": {**whisper["encoder_args"],
                                   "downsample_factor": whisper["downsample_args"]["downsample_factor"]}}
    if quantization:
        config["quantization"] = dict(quantization)
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(src / "tekken.json", dst / "tekken.json")
    mx.save_safetensors(str(dst / "model.safetensors"), tensors, metadata={"format": "mlx"})
    return dst
