"""segment-anything's global attention, computed a few heads at a time to bound its memory.

A ViT image encoder's global-attention blocks (4 of vit_b's 12) attend from each of the 64 x 64
image tokens to every other: segment-anything builds the ``(heads, 4096, 4096)`` float32 scores
at once, then their sum with the relative positions, then the softmax; for vit_b's 12 heads that
is three 805 MB tensors alive together, ~2.4 GB for every image embedded (the annotator's and a
training worker's). The same arithmetic over ``CHUNK_BYTES`` of scores at a time gives the same
embedding: embedding an image with random vit_b raised a process's memory by 0.71 GB instead of
2.66 GB, in the same time (bench/embedding_memory.py, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention, add_decomposed_rel_pos

CHUNK_BYTES = 128 * 2**20
"""Attention scores computed at once (float32): 2 of vit_b's 12 heads over its 64 x 64 tokens. One
head at a time held 0.18 GB less and took ~1.2x the time; three held 0.35 GB more."""


class HeadChunkedAttention(Attention):
    """``Attention`` whose ``forward`` computes ``(B * heads, HW, HW)`` scores a chunk of heads at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, dim)`` tokens -> ``(B, H, W, dim)``, as ``Attention.forward``."""
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        per_chunk = max(1, CHUNK_BYTES // (tokens * tokens * 4))
        outputs = []
        for start in range(0, len(q), per_chunk):
            heads = slice(start, start + per_chunk)
            scores = (q[heads] * self.scale) @ k[heads].transpose(-2, -1)
            if self.use_rel_pos:
                scores = add_decomposed_rel_pos(
                    scores, q[heads], self.rel_pos_h, self.rel_pos_w, (height, width), (height, width)
                )
            outputs.append(scores.softmax(dim=-1) @ v[heads])
        out = torch.cat(outputs).view(batch, self.num_heads, height, width, -1)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1))


def chunk_global_attention(image_encoder: torch.nn.Module) -> None:
    """Make the global-attention blocks of a ViT ``image_encoder`` compute their scores in chunks.

    Same weights and state-dict keys; the windowed blocks (14 x 14 tokens) and MobileSAM's TinyViT
    (vit_t, no ``Attention`` blocks) are left as they are.
    """
    for block in getattr(image_encoder, "blocks", ()):
        if getattr(block, "window_size", None) == 0 and type(block.attn) is Attention:
            block.attn.__class__ = HeadChunkedAttention
