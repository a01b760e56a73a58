"""TensorFlow weights in, LiteRT decoder models out (needs TensorFlow; the LiteRT backend does not).

One `.tflite` file per precision, each with three signatures over the same weights:
- `decode`: one new token for each of B rows, attending over a host-owned key/value *pool* of S
  slots that all rows share; returns each row's hidden state (the last block's output, before
  the final layer norm) and each layer's key and value for that token only ([H, B, D]). The
  host keeps the pool in this signature's own input tensors and writes the new slots itself, so
  it is never copied through a call. The additive mask [1, B, S + 1] says which slots are each
  row's own (the last column is the new token itself). Scores are one matmul of every row's
  query against the whole pool per head: the pool is read once a call, whatever the rows'
  lengths, where a cache per row [B, C] made every row read as many slots as the longest row
  holds. The scores of other rows' slots are masked to exactly zero weight (exp underflows), so
  a row's numbers do not depend on its neighbours.
- `extend`: N new tokens over a pool of S slots given with the call, and over each other, as the
  mask [1, N, S + N] allows; returns their keys and values ([H, N, D]) and hidden states. One
  prompt's tokens (causal among themselves: a prefill), or one token each of a few rows apart
  from the batch (the scheduler's short lane, whose small pool the host copies in per call).
- `head`: hidden states [M, E] -> logits [M, V] (the final layer norm and the tied LM head), for
  either of the others. Being its own signature, the LM head (a third of DistilGPT2's int8
  weights) is packed by XNNPACK once, not per signature.

The graph is written here from the weights (not by calling transformers' layers), in shapes
XNNPACK delegates whole: 2-D matmuls for every weight (a 3-D one stays fp32 under dynamic-range
quantization and ran 3-7x slower), reshapes with at most one open dimension, no GATHER (token and
position embeddings are looked up on the host, from `embeddings.npy` and `positions.npy`), and
the attention mask given as an additive input. The arithmetic is transformers' TF GPT-2: the
same layer norms, gelu_new, scaled dot-product attention and -1e4 mask.
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


@dataclass(frozen=True)
class Gpt2Shape:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    eps: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class _Decoder(tf.Module):
    """The three programs over one set of variables (the converter freezes them into the file)."""

    def __init__(self, weights: dict[str, np.ndarray], shape: Gpt2Shape):
        super().__init__()
        self.shape = shape
        self.w = {name: tf.Variable(value, trainable=False, name=name.replace(".", "_"))
                  for name, value in weights.items()}
        E, H, D = shape.n_embd, shape.n_head, shape.head_dim
        kv = [tf.TensorSpec([H, None, D], tf.float32, name=f"{kind}_{i}")
              for i in range(shape.n_layer) for kind in ("key", "value")]
        self.decode = tf.function(self._decode, input_signature=[
            tf.TensorSpec([None, 1, E], tf.float32, name="embeds"),
            tf.TensorSpec([1, None, None], tf.float32, name="mask"),
            *kv,
        ])
        self.extend = tf.function(self._extend, input_signature=[
            tf.TensorSpec([1, None, E], tf.float32, name="embeds"),
            tf.TensorSpec([1, None, None], tf.float32, name="mask"),
            tf.TensorSpec([None], tf.int32, name="rows"),
            *kv,
        ])
        self.head = tf.function(self._head, input_signature=[tf.TensorSpec([None, E], tf.float32, name="hidden")])

    # --- the three programs ---------------------------------------------------------------------

    def _extend(self, embeds, mask, rows, *pools):
        """embeds [1, N, E]; mask [1, N, S + N] additive (0 where a new token may look: its own
        pool slots, then itself and the new tokens before it); rows [M]: the new tokens whose
        hidden states are wanted (the last block's feed-forward runs for these only: a prefill
        wants none, and gives one); pools [H, S, D] each."""
        H, D, E = self.shape.n_head, self.shape.head_dim, self.shape.n_embd
        x, outputs = embeds, {}
        scale = math.sqrt(self.shape.head_dim)
        for i in range(self.shape.n_layer):
            k_pool, v_pool = pools[2 * i], pools[2 * i + 1]
            h = self._dense(self._norm(x, f"h{i}.ln_1"), f"h{i}.attn.c_attn")  # [N, 3E]
            q, k, v = (tf.transpose(tf.reshape(t, [-1, H, D]), [1, 0, 2]) for t in tf.split(h, 3, axis=-1))  # [H, N, D]
            # The pool here is small (a prompt's dummy slot, or the short lane's few rows), so it
            # is concatenated with the new keys and values: no slice of a dynamic size.
            w = tf.matmul(q, tf.concat([k_pool, k], axis=1), transpose_b=True) / scale  # [H, N, S + N]
            a = tf.matmul(tf.nn.softmax(w + mask, axis=-1), tf.concat([v_pool, v], axis=1))  # [H, N, D]
            outputs[f"key_{i}"], outputs[f"value_{i}"] = k, v  # [H, N, D]
            if i < self.shape.n_layer - 1:
                x = self._finish_merged(i, x, self._merge_heads(a), batch=1, length=-1)
            else:
                x = tf.gather(tf.reshape(x, [-1, E]), rows)[:, None, :]  # [M, 1, E]
                x = self._finish_merged(i, x, tf.gather(self._merge_heads(a), rows))
        outputs["hidden"] = tf.reshape(x, [-1, E])
        return outputs

    def _decode(self, embeds, mask, *pools):
        """embeds [B, 1, E]; mask [1, B, S + 1] additive (0 on a row's own slots and, last, on the
        new token itself; -1e4 elsewhere); pools: key_0, value_0, key_1, ... each [H, S, D]."""
        E, H, D = self.shape.n_embd, self.shape.n_head, self.shape.head_dim
        x, outputs = embeds, {}
        scale = math.sqrt(self.shape.head_dim)
        for i in range(self.shape.n_layer):
            k_pool, v_pool = pools[2 * i], pools[2 * i + 1]
            h = self._dense(self._norm(x, f"h{i}.ln_1"), f"h{i}.attn.c_attn")  # [B, 3E]
            q, k, v = (tf.transpose(tf.reshape(t, [-1, H, D]), [1, 0, 2]) for t in tf.split(h, 3, axis=-1))  # [H, B, D]
            # Scores over the pool and over the new token, then one softmax over both: the pool
            # is read in place, never concatenated with the new slot.
            w_pool = tf.matmul(q, k_pool, transpose_b=True) / scale  # [H, B, S]
            w_new = tf.reduce_sum(q * k, axis=-1, keepdims=True) / scale  # [H, B, 1]
            p = tf.nn.softmax(tf.concat([w_pool, w_new], axis=-1) + mask, axis=-1)
            a = tf.matmul(p[..., :-1], v_pool) + p[..., -1:] * v  # [H, B, D]
            x = self._finish_merged(i, x, self._merge_heads(a))
            outputs[f"key_{i}"], outputs[f"value_{i}"] = k, v  # [H, B, D]
        outputs["hidden"] = tf.reshape(x, [-1, E])
        return outputs

    def _head(self, hidden):
        """hidden [M, E] -> logits [M, V]: the final layer norm, and the tied LM head as one 2-D matmul."""
        return {"logits": tf.matmul(self._norm(hidden, "ln_f"), self.w["wte"], transpose_b=True)}

    # --- GPT-2's pieces -------------------------------------------------------------------------

    def _merge_heads(self, a):
        """[H, N, D] -> [N, E]."""
        return tf.reshape(tf.transpose(a, [1, 0, 2]), [-1, self.shape.n_embd])

    def _finish_merged(self, i, x, a, batch=-1, length=1):
        """The rest of block i after attention, with the heads merged: a [B*T, E]."""
        E = self.shape.n_embd
        x = x + tf.reshape(self._matmul(a, f"h{i}.attn.c_proj"), [batch, length, E])
        m = _gelu_new(self._dense(self._norm(x, f"h{i}.ln_2"), f"h{i}.mlp.c_fc"))
        return x + tf.reshape(self._matmul(m, f"h{i}.mlp.c_proj"), [batch, length, E])

    def _norm(self, x, name):
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + self.shape.eps) * self.w[f"{name}.gamma"] + self.w[f"{name}.beta"]

    def _dense(self, x, name):
        return self._matmul(tf.reshape(x, [-1, x.shape[-1]]), name)

    def _matmul(self, x2d, name):
        """transformers' TFConv1D: x @ W + b, with x already 2-D."""
        return tf.matmul(x2d, self.w[f"{name}.weight"]) + self.w[f"{name}.bias"]


def _gelu_new(x):
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def load_tf_weights(model_dir: Path) -> tuple[dict[str, np.ndarray], Gpt2Shape]:
    """The weights of a transformers TF GPT-2 checkpoint, by short names, and its shape."""
    from transformers import TFGPT2LMHeadModel

    from service.engine.tf_gpt2 import _check_supported

    model = TFGPT2LMHeadModel.from_pretrained(model_dir)
    config = model.config
    _check_supported(config)
    t = model.transformer
    weights = {"wte": t.wte.embeddings.numpy(), "wpe": t.wpe.embeddings.numpy(),
               "ln_f.gamma": t.ln_f.gamma.numpy(), "ln_f.beta": t.ln_f.beta.numpy()}
    for i, block in enumerate(t.h):
        for norm in ("ln_1", "ln_2"):
            layer = getattr(block, norm)
            weights[f"h{i}.{norm}.gamma"], weights[f"h{i}.{norm}.beta"] = layer.gamma.numpy(), layer.beta.numpy()
        for name, layer in (("attn.c_attn", block.attn.c_attn), ("attn.c_proj", block.attn.c_proj),
                            ("mlp.c_fc", block.mlp.c_fc), ("mlp.c_proj", block.mlp.c_proj)):
            weights[f"h{i}.{name}.weight"] = layer.weight.numpy()
            weights[f"h{i}.{name}.bias"] = layer.bias.numpy().reshape(-1)
    shape = Gpt2Shape(config.n_layer, config.n_head, config.n_embd, config.vocab_size, config.n_positions,
                      float(config.layer_norm_epsilon))
    del model
    return weights, shape


def convert(weights: dict[str, np.ndarray], shape: Gpt2Shape) -> dict[str, bytes]:
    """The decoder as LiteRT flatbuffers: {"fp32": ..., "int8": ...} (int8: dynamic-range weights)."""
    module = _Decoder({k: v for k, v in weights.items() if k != "wpe"}, shape)
    with tempfile.TemporaryDirectory() as tmp:
        # The converter takes several signatures from a SavedModel; their weights are shared.
        tf.saved_model.save(module, tmp, signatures={
            "extend": module.extend.get_concrete_function(),
            "decode": module.decode.get_concrete_function(),
            "head": module.head.get_concrete_function(),
        })
        out = {}
        for precision in ("fp32", "int8"):
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["extend", "decode", "head"])
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no TF ops at run time
            if precision == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no dataset: weights only
            out[precision] = converter.convert()
    return out
