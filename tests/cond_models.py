"""Tiny class-conditional models for the conditioning and guidance tests."""
import torch

import fastddpm


def tiny_cond_unet(K=3, null_row=True):
    """A tiny random UNet(num_classes=K), 3x8x8, in eval mode. null_row: its label embedding has
    row K, the null class (as UNet(num_classes=K) has once it carries its null class; added where
    it does not yet); False: K rows only, a UNet without a null class."""
    torch.manual_seed(0)
    m = fastddpm.UNet.from_preset("tiny", ch=16, norm_groups=8, image_size=8, num_classes=K)
    rows = K + 1 if null_row else K
    if m.label_emb.num_embeddings != rows:
        m.label_emb = torch.nn.Embedding(rows, m.label_emb.embedding_dim)
    return m.eval().requires_grad_(False)
