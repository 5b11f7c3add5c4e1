"""Two-way transformer for both decoder stages, with SAM's parameter names.

Compared with segment_anything's `TwoWayTransformer` it adds what H-SAM needs: a choice of
block order (SAM: self-attention first; the released H-SAM code: token-to-image first), an
optional class prior that modulates the cross-attention weights (stage 2), and dropout on
the token-to-image branch. With `order="self_first"`, no prior and no dropout it computes
exactly SAM's function, so SAM's pretrained decoder weights load and behave as trained.
"""

from __future__ import annotations

from typing import Literal

from segment_anything.modeling.common import MLPBlock
from torch import Tensor, nn

from hsam.modeling.attention import FusedAttention

BlockOrder = Literal["self_first", "cross_first"]


class TwoWayBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention."""

    def __init__(
        self,
        *,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int,
        skip_first_layer_pe: bool,
        order: BlockOrder = "self_first",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.self_attn = FusedAttention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = FusedAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, nn.ReLU)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = FusedAttention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.dropout = nn.Dropout(dropout)
        self.skip_first_layer_pe = skip_first_layer_pe
        self.order = order

    def _self_attention(self, queries: Tensor, query_pe: Tensor) -> Tensor:
        if self.skip_first_layer_pe:
            # SAM's first layer: no positional encoding and no residual.
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        return self.norm1(queries)

    def _token_to_image(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, prior: Tensor | None
    ) -> Tensor:
        out = self.cross_attn_token_to_image(
            q=queries + query_pe, k=keys + key_pe, v=keys, prior=prior
        )
        return self.norm2(queries + self.dropout(out))

    def forward(
        self,
        queries: Tensor,
        keys: Tensor,
        query_pe: Tensor,
        key_pe: Tensor,
        token_prior: Tensor | None = None,
        image_prior: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """
        Arguments:
          queries: (B, N, C) tokens; query_pe: (B or 1, N, C) their positional embedding.
          keys: (B, L, C) image tokens; key_pe: (B or 1, L, C).
          token_prior: optional (B, N, L) weights for token-to-image attention.
          image_prior: optional (B, L, N) weights for image-to-token attention.

        Returns:
          Updated (queries, keys) of the same shapes.
        """
        if self.order == "self_first":
            queries = self._self_attention(queries, query_pe)
            queries = self._token_to_image(queries, keys, query_pe, key_pe, token_prior)
        else:
            queries = self._token_to_image(queries, keys, query_pe, key_pe, token_prior)
            queries = self._self_attention(queries, query_pe)
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        k = keys + key_pe
        keys = keys + self.cross_attn_image_to_token(q=k, k=q, v=queries, prior=image_prior)
        return queries, self.norm4(keys)


class TwoWayTransformer(nn.Module):
    """A stack of `TwoWayBlock`s and a final (plain) token-to-image attention."""

    def __init__(
        self,
        *,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        attention_downsample_rate: int = 2,
        final_attention_downsample_rate: int | None = None,
        order: BlockOrder = "self_first",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
                order=order,
                dropout=dropout,
            )
            for i in range(depth)
        )
        final_rate = final_attention_downsample_rate or attention_downsample_rate
        self.final_attn_token_to_image = FusedAttention(
            embedding_dim, num_heads, downsample_rate=final_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self,
        image_embedding: Tensor,
        image_pe: Tensor,
        tokens: Tensor,
        prior: Tensor | None = None,
        mask_image_to_token: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """
        Arguments:
          image_embedding: (B, C, h, w); image_pe: (1 or B, C, h, w).
          tokens: (B, N, C) query tokens (also used as their positional embedding, as SAM).
          prior: optional (B, N, h*w) class prior modulating the cross-attention of every
            block (not the final attention). Token i weighs pixel j by prior[i, j]; with
            `mask_image_to_token`, pixel j weighs token i by the same prior[i, j].

        Returns:
          queries (B, N, C) and keys (B, h*w, C).
        """
        keys = image_embedding.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, hw, C)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        token_prior = prior
        image_prior = prior.transpose(1, 2) if (prior is not None and mask_image_to_token) else None
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe, token_prior, image_prior)
        out = self.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + out), keys
