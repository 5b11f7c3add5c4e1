"""LoRA on a frozen encoder's linear layers.

`LoRAQKV` is the paper's: low-rank deltas on the q and v outputs of a fused qkv projection
only. `LoRALinear` adapts a whole linear layer (attention output projection, MLP layers) for
`model.lora_layers: all_linear`. Both keep the base layer's parameter names (`weight`,
`bias`), so official checkpoints load into a LoRA-injected encoder unchanged. Which output
features are q and which are v is given as index tensors because encoders lay out their fused
qkv differently (SAM ViT: [q | k | v]; TinyViT: per head [q_h | k_h | v_h]).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Self

from torch import Tensor, nn
from torch.nn import functional as F


class _LoRABase(nn.Linear):
    """A frozen `nn.Linear` (weight, bias) with rank and scaling s = alpha / rank (1 when alpha
    is None, as in the paper and the released code); subclasses add the trainable factors."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, rank: int, alpha: float | None
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}.")
        self.rank = rank
        self.scaling = 1.0 if alpha is None else alpha / rank

    @classmethod
    def from_linear(cls, base: nn.Linear, **lora: Any) -> Self:
        """Wrap `base`, sharing (not copying) its weight and bias and freezing them; `lora` are
        the subclass's own keyword arguments (rank, alpha, ...)."""
        layer = cls(
            in_features=base.in_features,
            out_features=base.out_features,
            bias=base.bias is not None,
            **lora,
        )
        layer.to(device=base.weight.device, dtype=base.weight.dtype)
        layer.weight = base.weight
        layer.bias = base.bias
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        return layer


class LoRAQKV(_LoRABase):
    """A frozen fused qkv `nn.Linear` plus trainable rank-r updates of its q and v outputs.

    out = W x + b;  out[q_index] += s * B_q A_q x;  out[v_index] += s * B_v A_v x
    with A kaiming-uniform, B zero (so a fresh layer equals the base layer exactly) and
    s = alpha / rank (1 when alpha is None, as in the paper and the released code).
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        bias: bool,
        q_index: Tensor,
        v_index: Tensor,
        rank: int,
        alpha: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, rank=rank, alpha=alpha)
        self.register_buffer("q_index", q_index.long(), persistent=False)
        self.register_buffer("v_index", v_index.long(), persistent=False)
        self.lora_q_a = nn.Linear(in_features, rank, bias=False)
        self.lora_q_b = nn.Linear(rank, len(q_index), bias=False)
        self.lora_v_a = nn.Linear(in_features, rank, bias=False)
        self.lora_v_b = nn.Linear(rank, len(v_index), bias=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        for a, b in ((self.lora_q_a, self.lora_q_b), (self.lora_v_a, self.lora_v_b)):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        out = F.linear(x, self.weight, self.bias)
        dq = self.lora_q_b(self.lora_q_a(x)) * self.scaling
        dv = self.lora_v_b(self.lora_v_a(x)) * self.scaling
        out = out.index_add(-1, self.q_index, dq.to(out.dtype))
        return out.index_add(-1, self.v_index, dv.to(out.dtype))

    def lora_parameters(self) -> Iterable[nn.Parameter]:
        for m in (self.lora_q_a, self.lora_q_b, self.lora_v_a, self.lora_v_b):
            yield m.weight


class LoRALinear(_LoRABase):
    """A frozen `nn.Linear` plus a trainable rank-r update of its whole output.

    out = W x + b + s B A x, with A kaiming-uniform and B zero (a fresh layer equals the base
    layer exactly) and s as in `LoRAQKV`.
    """

    def __init__(
        self,
        *,
        in_features: int,
        out_features: int,
        bias: bool,
        rank: int,
        alpha: float | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, rank=rank, alpha=alpha)
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        out = F.linear(x, self.weight, self.bias)
        return out + (self.lora_b(self.lora_a(x)) * self.scaling).to(out.dtype)

    def lora_parameters(self) -> Iterable[nn.Parameter]:
        yield self.lora_a.weight
        yield self.lora_b.weight


def inject_lora(
    attention_modules: list[nn.Module],
    qv_indices: list[tuple[Tensor, Tensor]],
    *,
    rank: int,
    alpha: float | None,
) -> list[LoRAQKV]:
    """Replace `module.qkv` of each attention module by a `LoRAQKV` around it."""
    layers = []
    for module, (q_index, v_index) in zip(attention_modules, qv_indices, strict=True):
        layer = LoRAQKV.from_linear(
            module.qkv, q_index=q_index, v_index=v_index, rank=rank, alpha=alpha
        )
        module.qkv = layer
        layers.append(layer)
    return layers


def inject_lora_linears(
    blocks: list[nn.Module], *, skip: list[nn.Module], rank: int, alpha: float | None
) -> list[LoRALinear]:
    """Replace every plain `nn.Linear` inside `blocks` (but those in `skip`) by a `LoRALinear`
    around it: in a ViT or TinyViT block, the attention output projection and both MLP layers
    when `skip` holds the block's qkv."""
    layers = []
    for block in blocks:
        # Collected first: replacing while iterating named_modules would visit the wrappers.
        found = [
            (name, m)
            for name, m in block.named_modules()
            if type(m) is nn.Linear and not any(m is s for s in skip)
        ]
        for name, base in found:
            parent_name, _, attr = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            layer = LoRALinear.from_linear(base, rank=rank, alpha=alpha)
            setattr(parent, attr, layer)
            layers.append(layer)
    return layers
