"""A Hugging Face checkpoint of the Llama family, read as numpy arrays for the converter.

Reads `config.json` (which architecture, what shape, which rotary scaling) and the weights in
`model.safetensors` or the shards a `model.safetensors.index.json` names, without PyTorch:
safetensors' own numpy loader has no bfloat16, which most of these repositories store, so the
format (an 8-byte header length, a JSON header, then the raw little-endian tensors) is read
here, bfloat16 through `ml_dtypes`, and every tensor is widened to float32.

The names returned are the converter's (`service/engine/litert_convert.py`), shared with GPT-2:
`h{i}.attn.c_attn` is the query, key and value projections side by side (one matmul),
`h{i}.mlp.c_fc` the gate and up projections side by side, weights as [in, out].
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from service.model_files import CONFIG, SAFETENSORS, SAFETENSORS_INDEX, weight_files

# config.json's `architectures[0]` -> the converter's graph.
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "llama"}
ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def architecture(config: dict) -> str:
    """The graph a config.json asks for ("gpt2" or "llama"); one line naming what is supported
    otherwise."""
    names = config.get("architectures") or []
    name = names[0] if names else {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                   "qwen2": "Qwen2ForCausalLM"}.get(config.get("model_type"), config.get("model_type"))
    if name not in ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / CONFIG).read_text())


def llama_shape(config: dict) -> dict:
    """The converter's ModelShape fields for a Llama-family config, after refusing the options
    the graph does not implement."""
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    if config.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor other than 1 is not supported")
    rope_type(config)
    heads = int(config["num_attention_heads"])
    return {
        "architecture": "llama",
        "n_layer": int(config["num_hidden_layers"]),
        "n_head": heads,
        "n_kv_head": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // heads),
        "n_embd": int(config["hidden_size"]),
        "vocab_size": int(config["vocab_size"]),
        "n_positions": int(config["max_position_embeddings"]),
        "eps": float(config.get("rms_norm_eps", 1e-6)),
    }


def rope_type(config: dict) -> str:
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    return kind


def rope_table(config: dict, head_dim: int, positions: int) -> np.ndarray:
    """cos and sin of every position's rotary angles, [positions, 2 * head_dim] (cos, then sin),
    computed as transformers' `_compute_*_rope_parameters` and `LlamaRotaryEmbedding` compute
    them: inverse frequencies and angles in float32."""
    inv_freq = (1.0 / (np.float32(config.get("rope_theta", 10000.0))
                       ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim))))
    inv_freq = inv_freq.astype(np.float32)
    kind, scaling = rope_type(config), config.get("rope_scaling") or {}
    if kind == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # [P, D / 2]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, as float32 numpy arrays."""
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    data = np.memmap(path, np.uint8, mode="r", offset=8 + length)  # each tensor is read once, widened
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        kind = entry["dtype"]
        if kind == "BF16":
            import ml_dtypes  # TensorFlow's own dependency: the converter has it

            dtype = ml_dtypes.bfloat16
        elif kind in _DTYPES:
            dtype = _DTYPES[kind]
        else:
            raise ValueError(f"{path.name}: tensor {name} has dtype {kind}, not a float type")
        tensors[name] = data[start:end].view(dtype).reshape(entry["shape"]).astype(np.float32)
    return tensors


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by their Hugging Face names: model.safetensors, or every shard."""
    names = [n for n in weight_files(model_dir) if n != SAFETENSORS_INDEX]
    if not names or not all(n.endswith(".safetensors") for n in names):
        raise ValueError(f"{model_dir} holds no {SAFETENSORS} or {SAFETENSORS_INDEX}")
    tensors: dict[str, np.ndarray] = {}
    for name in names:
        tensors.update(read_safetensors(model_dir / name))
    return tensors


def llama_weights(model_dir: Path, config: dict, shape: dict) -> dict[str, np.ndarray]:
    """The converter's weights for a Llama-family checkpoint (see the module's docstring); "wte"
    is the embedding table (looked up on the host), "lm_head" the output projection [V, E]
    (the same array when the embeddings are tied) and "rope" the rotary table."""
    hf = read_weights(model_dir)

    def take(name: str) -> np.ndarray:
        if name not in hf:
            raise ValueError(f"{model_dir}: the weights have no tensor {name}")
        return hf.pop(name)

    def linear(prefix: str, parts: list[str], out: str) -> None:
        """Projections `parts` side by side as one [in, sum of outs] weight; a bias where any
        part has one (Qwen2's q/k/v; Llama's attention_bias and mlp_bias), zeros for the rest."""
        matrices = [take(f"{prefix}.{part}.weight") for part in parts]  # [out, in] each
        weights[f"{out}.weight"] = np.concatenate([m.T for m in matrices], axis=1)
        biases = [hf.pop(f"{prefix}.{part}.bias", None) for part in parts]
        if any(b is not None for b in biases):
            weights[f"{out}.bias"] = np.concatenate([b if b is not None else np.zeros(m.shape[0], np.float32)
                                                     for b, m in zip(biases, matrices)])

    weights: dict[str, np.ndarray] = {"wte": take("model.embed_tokens.weight")}
    for i in range(shape["n_layer"]):
        p = f"model.layers.{i}"
        weights[f"h{i}.ln_1.gamma"] = take(f"{p}.input_layernorm.weight")
        weights[f"h{i}.ln_2.gamma"] = take(f"{p}.post_attention_layernorm.weight")
        linear(f"{p}.self_attn", ["q_proj", "k_proj", "v_proj"], f"h{i}.attn.c_attn")
        linear(f"{p}.self_attn", ["o_proj"], f"h{i}.attn.c_proj")
        linear(f"{p}.mlp", ["gate_proj", "up_proj"], f"h{i}.mlp.c_fc")
        linear(f"{p}.mlp", ["down_proj"], f"h{i}.mlp.c_proj")
    weights["ln_f.gamma"] = take("model.norm.weight")
    head = hf.pop("lm_head.weight", None)
    weights["lm_head"] = weights["wte"] if config.get("tie_word_embeddings", False) or head is None else head
    weights["rope"] = rope_table(config, shape["head_dim"], shape["n_positions"])
    return weights

