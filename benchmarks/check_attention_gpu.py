"""On a GPU: cuDNN's fused attention against the materialized-scores (XLA) kernel, in bfloat16.

    python benchmarks/check_attention_gpu.py [--hidden 256] [--heads 4] [--layers 2]

Builds a small CTC model with padded rows, and computes the loss and gradients three ways: float32 with
the XLA kernel (the reference), bfloat16 with XLA, bfloat16 with cuDNN. Prints the relative error of
each bfloat16 run against the reference (cuDNN should be no worse than XLA's own bfloat16 error), then
one JSON line. Exits 1 when cuDNN's error exceeds twice XLA's plus 1e-3, or on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from xlsr_jax.config import get_preset
from xlsr_jax.models.heads import build_model, init_params


def _loss_and_grads(config, params, audio, mask):
    model = build_model(config, "ctc")

    def loss(p):
        logits = model.apply({"params": p}, audio, mask).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1] * 3.0 + logits[..., 0] ** 2)

    return jax.jit(jax.value_and_grad(loss))(params)


def _rel(a, b) -> float:
    flat_a = jnp.concatenate([x.ravel() for x in jax.tree.leaves(a)])
    flat_b = jnp.concatenate([x.ravel() for x in jax.tree.leaves(b)])
    return float(jnp.linalg.norm(flat_a - flat_b) / jnp.linalg.norm(flat_b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print(f"needs a GPU; JAX's backend is {jax.default_backend()}", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    audio = rng.standard_normal((4, 48000)).astype(np.float32)
    mask = np.ones_like(audio, np.int32)
    for row, keep in enumerate((48000, 40000, 25000, 9000)):
        mask[row, keep:] = 0
        audio[row, keep:] = 0
    config = get_preset("tiny", hidden_size=args.hidden, num_attention_heads=args.heads,
                        num_hidden_layers=args.layers, intermediate_size=4 * args.hidden, hidden_dropout=0.0)
    params = init_params(config, "ctc")
    ref_loss, ref_grads = _loss_and_grads(config.replace(attention_impl="xla"), params, audio, mask)
    result = {"head_dim": config.head_dim, "loss_f32": float(ref_loss)}
    for impl in ("xla", "cudnn"):
        loss, grads = _loss_and_grads(config.replace(dtype="bfloat16", attention_impl=impl), params, audio, mask)
        result[f"{impl}_bf16_loss_rel_err"] = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
        result[f"{impl}_bf16_grad_rel_err"] = _rel(grads, ref_grads)
        print(f"bf16 {impl:<6} loss rel err {result[f'{impl}_bf16_loss_rel_err']:.2e}, "
              f"grad rel err {result[f'{impl}_bf16_grad_rel_err']:.2e}")
    ok = result["cudnn_bf16_grad_rel_err"] <= 2 * result["xla_bf16_grad_rel_err"] + 1e-3
    print(json.dumps({"check": "attention_gpu", "device": jax.devices()[0].device_kind, "ok": ok, **result}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
