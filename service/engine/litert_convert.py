"""A model's weights in, LiteRT decoder models out (needs TensorFlow; the LiteRT backend does not).

Two architectures share one graph (`ModelShape.architecture`): GPT-2 (layer norms, learned
positions, gelu_new) and the Llama family (RMSNorm, rotary positions, SwiGLU, grouped-query
attention, tied or untied embeddings, optional q/k/v biases: Llama, SmolLM2, TinyLlama, Qwen2).

One `.tflite` file per precision, each with three signatures over the same weights:
- `decode`: one new token for each of B rows, attending over a host-owned key/value *pool* of S
  slots that all rows share; returns each row's hidden state (the last block's output, before
  the final norm) and each layer's key and value for that token only ([K, B, D], K key/value
  heads). The host keeps the pool in this signature's own input tensors and writes the new
  slots itself, so it is never copied through a call. The additive mask [1, B, S + 1] says
  which slots are each row's own (the last column is the new token itself). Each layer's
  attention is one custom op, `KVAttention` (see `kv_attention`), over the pool at the file's
  cache precision (`FILES`): float16 in the int8 file.
- `extend`: N new tokens over a pool of S slots given with the call, and over each other, as the
  mask [1, N, S + N] allows; returns their keys and values ([K, N, D]) and hidden states. One
  prompt's tokens (causal among themselves: a prefill), or one token each of a few rows apart
  from the batch (the scheduler's short lane, whose small pool the host copies in per call).
- `head`: hidden states [M, E] -> logits [M, V] (the final norm and the LM head), for either of
  the others, as outputs `logits_0`, `logits_1`, ...: the vocabulary in slices of at most
  `HEAD_SLICE_WEIGHTS` weights each, which the host joins. Being its own signature, the LM head
  (a third of DistilGPT2's int8 weights) is packed by XNNPACK once, not per signature; being
  sliced, it leaves no second copy behind (see `HEAD_SLICE_WEIGHTS`).

The graph is written here from the weights (not by calling transformers' layers), in shapes
XNNPACK delegates whole: 2-D matmuls for every weight (a 3-D one stays fp32 under dynamic-range
quantization and ran 3-7x slower), reshapes with at most one open dimension, no GATHER (token
embeddings, GPT-2's position embeddings and the rotary cos/sin tables are looked up on the host,
from `embeddings.npy` and `positions.npy`), and the attention mask given as an additive input.
The arithmetic is transformers': TF GPT-2's layer norms, gelu_new, scaled dot-product attention
and -1e4 mask; Llama's RMSNorm, `apply_rotary_pos_emb` and SwiGLU.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


# XNNPACK's weight-cache builder packs each weight in a scratch buffer, which it keeps for the
# model's life at the size of the largest weight it packed (ai-edge-litert 2.3.0, TFLite's
# `WeightCacheBuilder::Reserve`). An LM head packed whole left a second head in anonymous memory,
# unused: 37 MiB for DistilGPT2 int8, 147 MiB fp32, 130 MiB for Qwen2.5-0.5B int8. In slices of
# this many weights (4 MiB int8) the buffer is a slice's; 10 slices for DistilGPT2.
HEAD_SLICE_WEIGHTS = 1 << 22


def head_slices(vocab_size: int, width: int) -> list[tuple[int, int]]:
    """The LM head's row ranges [start, end), in order: as few slices as hold at most
    `HEAD_SLICE_WEIGHTS` weights each, of nearly equal rows."""
    count = max(1, math.ceil(vocab_size * width / HEAD_SLICE_WEIGHTS))
    rows = math.ceil(vocab_size / count)
    return [(start, min(vocab_size, start + rows)) for start in range(0, vocab_size, rows)]


@dataclass(frozen=True)
class ModelShape:
    """What the graph is built from: an architecture's switches and sizes.

    `architecture` is "gpt2" (learned positions added to the embeddings on the host, layer
    norms, gelu_new, one fused c_attn) or "llama" (rotary positions: each row's cos and sin
    come from the host as the `rope` input; RMSNorm, SwiGLU, grouped-query attention with
    `n_kv_head` key/value heads; Qwen2 adds q/k/v biases, taken wherever the weights have them)."""

    architecture: str
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    eps: float
    n_kv_head: int = 0  # 0: as many as n_head
    head_dim: int = 0  # 0: n_embd // n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def rotary(self) -> bool:
        return self.architecture == "llama"


class _Decoder(tf.Module):
    """The three programs over one set of variables (the converter freezes them into the file)."""

    def __init__(self, weights: dict[str, np.ndarray], shape: ModelShape):
        super().__init__()
        self.shape = shape
        head = weights.pop("lm_head")
        slices = head_slices(*head.shape)
        self.head_slices = len(slices)
        for i, (start, end) in enumerate(slices):
            weights[f"lm_head.{i}"] = head[start:end]
        del head
        # Each array is let go of once its variable holds a copy (see `convert`).
        self.w = {name: tf.Variable(weights.pop(name), trainable=False, name=name.replace(".", "_"))
                  for name in list(weights)}
        E, K, D = shape.n_embd, shape.kv_heads, shape.dim
        def pools(dtype):
            return [tf.TensorSpec([K, None, D], dtype, name=f"{kind}_{i}")
                    for i in range(shape.n_layer) for kind in ("key", "value")]
        # Rotary models take each new token's cos and sin ([N, 2D]: cos, then sin), looked up on
        # the host like the embeddings.
        rope = [tf.TensorSpec([None, 2 * D], tf.float32, name="rope")] if shape.rotary else []
        # One decode program per cache precision (FILES): the pool inputs' type differs.
        self.decode = {cache: tf.function(self._decode, input_signature=[
            tf.TensorSpec([None, 1, E], tf.float32, name="embeds"),
            tf.TensorSpec([1, None, None], tf.float32, name="mask"),
            *rope,
            *pools(dtype),
        ]) for cache, dtype in {"float32": tf.float32, "float16": tf.float16}.items()}
        self.extend = tf.function(self._extend, input_signature=[
            tf.TensorSpec([1, None, E], tf.float32, name="embeds"),
            tf.TensorSpec([1, None, None], tf.float32, name="mask"),
            tf.TensorSpec([None], tf.int32, name="rows"),
            *rope,
            *pools(tf.float32),
        ])
        self.head = tf.function(self._head, input_signature=[tf.TensorSpec([None, E], tf.float32, name="hidden")])

    # --- the three programs ---------------------------------------------------------------------

    def _extend(self, embeds, mask, rows, *inputs):
        """embeds [1, N, E]; mask [1, N, S + N] additive (0 where a new token may look: its own
        pool slots, then itself and the new tokens before it); rows [M]: the new tokens whose
        hidden states are wanted (the last block's feed-forward runs for these only: a prefill
        wants none, and gives one); rope [N, 2D] for rotary models; pools [K, S, D] each."""
        rope, pools = self._split_inputs(inputs)
        E = self.shape.n_embd
        x, outputs = embeds, {}
        scale = math.sqrt(self.shape.dim)
        mask = self._group(mask)  # [1, G * N, S + N]
        for i in range(self.shape.n_layer):
            k_pool, v_pool = pools[2 * i], pools[2 * i + 1]
            q, k, v = self._qkv(i, x, rope)  # [K, G * N, D], [K, N, D], [K, N, D]
            # The pool here is small (a prompt's dummy slot, or the short lane's few rows), so it
            # is concatenated with the new keys and values: no slice of a dynamic size.
            w = tf.matmul(q, tf.concat([k_pool, k], axis=1), transpose_b=True) / scale  # [K, G * N, S + N]
            a = tf.matmul(tf.nn.softmax(w + mask, axis=-1), tf.concat([v_pool, v], axis=1))  # [K, G * N, D]
            outputs[f"key_{i}"], outputs[f"value_{i}"] = k, v  # [K, N, D]
            if i < self.shape.n_layer - 1:
                x = self._finish_merged(i, x, self._merge_heads(a), batch=1, length=-1)
            else:
                x = tf.gather(tf.reshape(x, [-1, E]), rows)[:, None, :]  # [M, 1, E]
                x = self._finish_merged(i, x, tf.gather(self._merge_heads(a), rows))
        outputs["hidden"] = tf.reshape(x, [-1, E])
        return outputs

    def _decode(self, embeds, mask, *inputs):
        """embeds [B, 1, E]; mask [1, B, S + 1] additive (0 on a row's own slots and, last, on the
        new token itself; -1e4 elsewhere); rope [B, 2D] for rotary models; pools: key_0,
        value_0, key_1, ... each [K, S, D], of the file's cache precision."""
        rope, pools = self._split_inputs(inputs)
        E = self.shape.n_embd
        x, outputs = embeds, {}
        for i in range(self.shape.n_layer):
            q, k, v = self._qkv(i, x, rope)  # [K, G * B, D], [K, B, D], [K, B, D]
            a = kv_attention(q, k, v, pools[2 * i], pools[2 * i + 1], mask)  # [K, G * B, D]
            x = self._finish_merged(i, x, self._merge_heads(a))
            outputs[f"key_{i}"], outputs[f"value_{i}"] = k, v  # [K, B, D]
        outputs["hidden"] = tf.reshape(x, [-1, E])
        return outputs

    def _head(self, hidden):
        """hidden [M, E] -> logits [M, V]: the final norm, and the LM head ([V, E]: tied to the
        embeddings or its own) as a 2-D matmul per slice of the vocabulary (`head_slices`)."""
        x = self._norm(hidden, "ln_f")
        return {f"logits_{i}": tf.matmul(x, self.w[f"lm_head.{i}"], transpose_b=True)
                for i in range(self.head_slices)}

    # --- shared pieces --------------------------------------------------------------------------

    def _split_inputs(self, inputs):
        """(the rotary cos and sin [1, N, D] each, or None; the pools)."""
        if not self.shape.rotary:
            return None, inputs
        D = self.shape.dim
        return (inputs[0][None, :, :D], inputs[0][None, :, D:]), inputs[1:]

    @property
    def _groups(self) -> int:
        """Query heads a key/value head serves (G; 1 but for grouped-query attention)."""
        return self.shape.n_head // self.shape.kv_heads

    def _group(self, t):
        """G copies of t [X, N, Y] along its second axis: [X, G * N, Y] (t itself when G is 1).

        With grouped-query attention the queries are laid out [K, G * N, D] (query head k * G + g,
        token n at row g * N + n: transformers' `repeat_kv` order), so that each key/value head's
        pool is read by one matmul for all of its query heads and is never copied; what is per
        token (the mask, the new token's own key and value, the rotary cos and sin) is repeated
        G times instead, which is small. Every reshape keeps at most one open dimension
        (XNNPACK delegates those)."""
        return t if self._groups == 1 else tf.concat([t] * self._groups, axis=1)

    def _merge_heads(self, a):
        """[K, G * N, D] -> [N, H * D]."""
        H, K, D = self.shape.n_head, self.shape.kv_heads, self.shape.dim
        if self._groups > 1:
            a = tf.reshape(a, [K * self._groups, -1, D])  # [H, N, D]: head k * G + g
        return tf.reshape(tf.transpose(a, [1, 0, 2]), [-1, H * D])

    def _qkv(self, i, x, rope):
        """Block i's queries [K, G * N, D], keys and values [K, N, D] for x [B, T, E]
        (N = B * T), the queries and keys rotated for their positions in rotary models."""
        H, K, D = self.shape.n_head, self.shape.kv_heads, self.shape.dim
        h = self._dense(self._norm(x, f"h{i}.ln_1"), f"h{i}.attn.c_attn")  # [N, (H + 2K) D]
        sizes = 3 if H == K else [H * D, K * D, K * D]
        q, k, v = (tf.transpose(tf.reshape(t, [-1, n, D]), [1, 0, 2])
                   for t, n in zip(tf.split(h, sizes, axis=-1), (H, K, K)))  # [heads, N, D]
        if rope is not None:
            cos, sin = rope
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self._groups > 1:
            q = tf.reshape(q, [K, -1, D])  # [H, N, D] -> [K, G * N, D]
        return q, k, v

    def _finish_merged(self, i, x, a, batch=-1, length=1):
        """The rest of block i after attention, with the heads merged: a [B*T, H * D]."""
        E = self.shape.n_embd
        x = x + tf.reshape(self._matmul(a, f"h{i}.attn.c_proj"), [batch, length, E])
        h = self._dense(self._norm(x, f"h{i}.ln_2"), f"h{i}.mlp.c_fc")
        if self.shape.architecture == "gpt2":
            m = _gelu_new(h)
        else:  # SwiGLU: c_fc is the gate and up projections side by side
            gate, up = tf.split(h, 2, axis=-1)
            m = tf.nn.silu(gate) * up
        return x + tf.reshape(self._matmul(m, f"h{i}.mlp.c_proj"), [batch, length, E])

    def _norm(self, x, name):
        if self.shape.architecture == "gpt2":
            mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
            return (x - mean) * tf.math.rsqrt(variance + self.shape.eps) * self.w[f"{name}.gamma"] + self.w[f"{name}.beta"]
        # RMSNorm, as transformers' LlamaRMSNorm (in float32 throughout).
        variance = tf.reduce_mean(tf.square(x), axis=-1, keepdims=True)
        return x * tf.math.rsqrt(variance + self.shape.eps) * self.w[f"{name}.gamma"]

    def _dense(self, x, name):
        return self._matmul(tf.reshape(x, [-1, x.shape[-1]]), name)

    def _matmul(self, x2d, name):
        """x @ W (+ b where the weights have a bias), with x already 2-D and W [in, out]."""
        y = tf.matmul(x2d, self.w[f"{name}.weight"])
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias


# The decode program's attention is one CUSTOM op, `KVAttention` (service/engine/native/kvattn.c):
# the converter turns a function marked `tfl_fusable_op` into a custom op of its name, its
# inputs and outputs as the function's. Its body is the op's contract in TensorFlow (what the
# kernel computes; it never runs in LiteRT). The kernel reads the pool where it lies, in float16
# or float32, each row's own slots only (a masked slot is never read, where BATCH_MATMUL read
# every slot for every row, in float32, after XNNPACK had packed the pool again), and is the
# only consumer of the pool inputs, so that they may be float16 (XNNPACK has no float16 batched
# matmul on x86).
KV_ATTENTION = 'name: "KVAttention" attr {key: "tfl_fusable_op" value { b: true } }'
MASK_SKIPPED = -1e3  # the kernel leaves out a slot whose mask is below this (the service's is -1e4)


@tf.function(experimental_implements=KV_ATTENTION)
def kv_attention(q, k_new, v_new, key, value, mask):
    """One layer's attention for one new token per row over the shared pool.

    q [K, G * B, D] (row g * B + b: query head k * G + g of row b); k_new, v_new [K, B, D]: each
    row's new key and value; key, value [K, S, D]: the pool; mask [1, B, S + 1] additive (the
    last column is the new token's). Returns [K, G * B, D]: softmax(q . k / sqrt(D) + mask)
    over the pool's slots and the row's new token, times their values; the weight of a slot
    masked by -1e4 is exactly zero, so it is left out."""
    groups = tf.shape(q)[1] // tf.shape(k_new)[1]
    scale = math.sqrt(q.shape[-1])
    key, value = tf.cast(key, tf.float32), tf.cast(value, tf.float32)
    k_new, v_new = tf.tile(k_new, [1, groups, 1]), tf.tile(v_new, [1, groups, 1])
    w_pool = tf.matmul(q, key, transpose_b=True) / scale  # [K, G * B, S]
    w_new = tf.reduce_sum(q * k_new, axis=-1, keepdims=True) / scale  # [K, G * B, 1]
    p = tf.nn.softmax(tf.concat([w_pool, w_new], axis=-1) + tf.tile(mask, [1, groups, 1]), axis=-1)
    return tf.matmul(p[..., :-1], value) + p[..., -1:] * v_new


def _rotate(t, cos, sin):
    """Rotary position embedding of t [heads, N, D] by each token's cos and sin [N, D], as
    transformers' `apply_rotary_pos_emb`: t * cos + rotate_half(t) * sin."""
    half = t.shape[-1] // 2
    return t * cos + tf.concat([-t[..., half:], t[..., :half]], axis=-1) * sin


def _gelu_new(x):
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


HOST_ONLY = ("wte", "wpe", "rope")  # looked up on the host, never in the graph
# The files: each one's weights and key/value cache precision. int8 weights go with a float16
# cache (the int8 quality gate judges the two together, through the decode path), fp32 with a
# float32 one.
FILES = {"fp32": ("fp32", "float32"), "int8": ("int8", "float16")}


def load_weights(model_dir: Path) -> tuple[dict[str, np.ndarray], ModelShape]:
    """The weights by the converter's names, and the shape, of the model in `model_dir`: GPT-2
    from its TensorFlow checkpoint, the Llama family from safetensors (`checkpoint`); any other
    architecture is refused with one line naming the supported ones."""
    from service.engine import checkpoint

    config = checkpoint.read_config(model_dir)
    if checkpoint.architecture(config) == "gpt2":
        return load_tf_weights(model_dir)
    fields = checkpoint.llama_shape(config)
    return checkpoint.llama_weights(model_dir, config, fields), ModelShape(**fields)


def load_tf_weights(model_dir: Path) -> tuple[dict[str, np.ndarray], ModelShape]:
    """The weights of a transformers TF GPT-2 checkpoint, by short names, and its shape."""
    from transformers import TFGPT2LMHeadModel

    from service.engine.tf_gpt2 import _check_supported

    model = TFGPT2LMHeadModel.from_pretrained(model_dir)
    config = model.config
    _check_supported(config)
    t = model.transformer
    wte = t.wte.embeddings.numpy()
    weights = {"wte": wte, "lm_head": wte, "wpe": t.wpe.embeddings.numpy(),
               "ln_f.gamma": t.ln_f.gamma.numpy(), "ln_f.beta": t.ln_f.beta.numpy()}
    for i, block in enumerate(t.h):
        for norm in ("ln_1", "ln_2"):
            layer = getattr(block, norm)
            weights[f"h{i}.{norm}.gamma"], weights[f"h{i}.{norm}.beta"] = layer.gamma.numpy(), layer.beta.numpy()
        for name, layer in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                            ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
            weights[f"h{i}.{name}.weight"] = layer.weight.numpy()
            weights[f"h{i}.{name}.bias"] = layer.bias.numpy().reshape(-1)
    shape = ModelShape("gpt2", config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.n_positions,
                       float(config.layer_norm_epsilon))
    del model
    return weights, shape


def host_positions(weights: dict[str, np.ndarray]) -> np.ndarray:
    """What the host looks up per position: GPT-2's learned position embeddings [P, E] (added
    to the token's), or a rotary model's cos and sin [P, 2D] (the `rope` input)."""
    return weights["wpe"] if "wpe" in weights else weights["rope"]


def convert(weights: dict[str, np.ndarray], shape: ModelShape,
            files: dict[str, tuple[str, str]] = FILES) -> dict[str, bytes]:
    """The decoder as LiteRT flatbuffers, one per entry of `files` (name: weights "fp32" or
    "int8" (dynamic-range), cache "float32" or "float16"): {"fp32": ..., "int8": ...}.

    Consumes `weights`: the graph's arrays leave the dict as they become variables, and the
    variables go once the SavedModel is written. TensorFlow's converter holds several copies of
    the weights while it runs (a 135M-parameter model: about 5 GB at its peak), so nothing else
    of them should be held then."""
    module = _Decoder({k: weights.pop(k) for k in list(weights) if k not in HOST_ONLY}, shape)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        # The converter takes several signatures from a SavedModel; their weights are shared.
        # One SavedModel per cache precision: its decode program takes the pool at that precision.
        for cache in {cache for _, cache in files.values()}:
            tf.saved_model.save(module, f"{tmp}/{cache}", signatures={
                "extend": module.extend.get_concrete_function(),
                "decode": module.decode[cache].get_concrete_function(),
                "head": module.head.get_concrete_function(),
            })
        del module
        for name, (precision, cache) in files.items():
            converter = tf.lite.TFLiteConverter.from_saved_model(f"{tmp}/{cache}",
                                                                 signature_keys=["extend", "decode", "head"])
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no TF ops at run time
            converter.allow_custom_ops = True  # KVAttention, and only it (`kv_attention`)
            if precision == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no dataset: weights only
            out[name] = converter.convert()
    return out
