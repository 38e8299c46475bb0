"""Random Hugging Face PyTorch wav2vec2 models built from our configs, and their outputs."""

from __future__ import annotations

import numpy as np

from xlsr_jax.config import HF_ARCHITECTURES, Wav2Vec2Config

torch = __import__("pytest").importorskip("torch")
transformers = __import__("pytest").importorskip("transformers")


def hf_config(config: Wav2Vec2Config) -> transformers.Wav2Vec2Config:
    return transformers.Wav2Vec2Config(**config.to_hf_dict())


def random_hf_model(config: Wav2Vec2Config, head: str, seed: int = 0):
    """An eval-mode HF model of `head` with random weights (norm affines randomized too)."""
    torch.manual_seed(seed)
    model = getattr(transformers, HF_ARCHITECTURES[head])(hf_config(config)).eval()
    # Default inits leave LayerNorm at (1, 0) and some biases at 0: randomize them so a transposed or
    # dropped parameter cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layer_weights" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(num_samples=(9000, 6400), seed: int = 0):
    """Unit-scale random audio, the second utterance shorter (zero-padded) with an attention mask."""
    rng = np.random.RandomState(seed)
    total = max(num_samples)
    audio = np.zeros((len(num_samples), total), np.float32)
    mask = np.zeros((len(num_samples), total), np.int32)
    for i, n in enumerate(num_samples):
        audio[i, :n] = rng.randn(n)
        mask[i, :n] = 1
    return audio, mask


def hf_forward(model, audio, mask, **kwargs):
    with torch.no_grad():
        return model(torch.tensor(audio), attention_mask=torch.tensor(mask, dtype=torch.long),
                     output_hidden_states=True, **kwargs)


def state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
