"""Tiny class-conditional models for the conditioning and guidance tests."""
import torch

import fastddpm


def tiny_cond_unet(K=3):
    """A tiny random UNet(num_classes=K), 3x8x8, in eval mode, with K + 1 label embeddings: row K
    is the null class (as UNet(num_classes=K) has it; added where the UNet does not have it yet)."""
    torch.manual_seed(0)
    m = fastddpm.UNet.from_preset("tiny", ch=16, norm_groups=8, image_size=8, num_classes=K)
    if m.label_emb.num_embeddings == K:
        m.label_emb = torch.nn.Embedding(K + 1, m.label_emb.embedding_dim)
    return m.eval().requires_grad_(False)
