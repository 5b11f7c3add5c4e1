"""Prompt-free prompt encoder: SAM's dense positional encoding and a learned no-mask embedding."""

from __future__ import annotations

from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
from torch import Tensor, nn


class PromptFreeEncoder(nn.Module):
    """What is left of SAM's prompt encoder when no point, box or mask is ever given.

    Keeps SAM's parameter names (`pe_layer.positional_encoding_gaussian_matrix`,
    `no_mask_embed.weight`) so they load from SAM checkpoints. The random-Fourier Gaussian is
    a fixed buffer; `no_mask_embed` is trained ("updating a default embedding" in the paper).
    """

    def __init__(self, *, embed_dim: int, image_embedding_size: tuple[int, int]) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> Tensor:
        """(1, C, h, w) positional encoding of the embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def dense_embedding(self) -> Tensor:
        """(1, C, h, w) the no-mask embedding broadcast over the grid."""
        h, w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, h, w)
