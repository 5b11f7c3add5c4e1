"""Model structure, shapes, gradients and train/eval behaviour on the tiny preset."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.nn import functional as F

from hsam.build import build_hsam, build_hsam_network
from hsam.modeling.cmattn import class_noise_std_from_frequencies


def _batch(cfg, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, cfg.image_size, cfg.image_size, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (b, cfg.image_size, cfg.image_size), generator=g)
    return x, y


def test_tiny_output_shapes(tiny_cfg):
    model = build_hsam(tiny_cfg).model
    x, y = _batch(tiny_cfg)
    out = model(x, y)
    t, s, h = tiny_cfg.num_classes + 1, tiny_cfg.image_size, tiny_cfg.image_size // 16
    # T (with background) is the model's num_tokens; num_classes is K everywhere else, so the
    # model has no attribute of that name to confuse with it.
    assert model.num_tokens == t
    assert not hasattr(model, "num_classes")
    assert out.stage1_logits.shape == (2, t, 4 * h, 4 * h)
    assert out.stage2_logits.shape == (2, t, s, s)
    assert out.probabilities.shape == (2, t, s, s)
    assert torch.allclose(out.probabilities.sum(1), torch.ones(2, s, s), atol=1e-5)


def test_one_stage_is_samed_baseline(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, stages=1)
    model = build_hsam(cfg).model
    assert model.stage2_decoder is None
    out = model(_batch(cfg)[0])
    assert out.stage2_logits is None
    up = F.interpolate(out.stage1_logits, size=out.probabilities.shape[-2:], mode="bilinear")
    assert torch.allclose(out.probabilities, up.softmax(1), atol=1e-6)


def test_ablation_switches_remove_components(tiny_cfg):
    cfg = dataclasses.replace(
        tiny_cfg, cmattn="off", hierarchical_pixel_decoder=False, mask_attention=False
    )
    model = build_hsam(cfg).model
    assert model.stage2_decoder.cmattn is None
    assert model.stage2_decoder.pixel_decoder is None
    out = model(_batch(cfg)[0])
    assert out.stage2_logits.shape[-1] == cfg.image_size


def test_only_lora_decoder_and_prompt_are_trainable(tiny_cfg):
    model = build_hsam(tiny_cfg).model
    for name, p in model.named_parameters():
        expected = (
            "lora_" in name
            or name == "prompt_encoder.no_mask_embed.weight"
            or name.startswith("stage2_decoder.")
            or (name.startswith("mask_decoder.") and "iou_prediction_head" not in name)
        )
        assert p.requires_grad == expected, name


def test_fresh_lora_equals_base_encoder(tiny_cfg):
    torch.manual_seed(0)
    base = build_hsam_network(tiny_cfg)
    adapted = copy.deepcopy(base)
    from hsam.build import apply_lora_and_freeze

    apply_lora_and_freeze(adapted, tiny_cfg)
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(base.encode(x), adapted.encode(x))


def _effective_qkv(layer):
    """W + scatter(B A) for a LoRAQKV layer, shape (out, in)."""
    w = layer.weight.detach().clone()
    w[layer.q_index] += (layer.lora_q_b.weight @ layer.lora_q_a.weight).detach() * layer.scaling
    w[layer.v_index] += (layer.lora_v_b.weight @ layer.lora_v_a.weight).detach() * layer.scaling
    return w


@pytest.mark.parametrize("backbone,size", [("tiny", 64), ("litemedsam", 256)])
def test_one_step_changes_only_q_and_v(backbone, size):
    from hsam.config import ModelConfig
    from hsam.modeling.lora import LoRAQKV

    cfg = ModelConfig(backbone=backbone, image_size=size, num_classes=1, lora_last_n=1)
    model = build_hsam(cfg, pretrained=False).model
    layers = [m for m in model.modules() if isinstance(m, LoRAQKV)]
    assert len(layers) == 1  # lora_last_n=1
    before = [_effective_qkv(m) for m in layers]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.rand(1, 1, size, size)
    y = (x[:, 0] > 0.5).long()
    # Two steps: after the first, B != 0 so A receives gradient too.
    for _ in range(2):
        out = model(x, y)
        F.cross_entropy(out.stage2_logits, y).backward()
        opt.step()
        opt.zero_grad()
    for layer, w0 in zip(layers, before, strict=True):
        w1 = _effective_qkv(layer)
        changed = (w1 - w0).abs().sum(1) > 0
        k_index = torch.tensor(
            sorted(
                set(range(w0.shape[0])) - set(layer.q_index.tolist()) - set(layer.v_index.tolist())
            )
        )
        assert changed[layer.q_index].all()
        assert changed[layer.v_index].all()
        assert not changed[k_index].any()


@pytest.mark.parametrize("backbone,size", [("tiny", 64), ("litemedsam", 256)])
def test_all_linear_lora_adapts_every_linear_layer_of_the_adapted_blocks(backbone, size):
    from hsam.config import ModelConfig
    from hsam.modeling.lora import LoRALinear, LoRAQKV

    cfg = ModelConfig(
        backbone=backbone, image_size=size, num_classes=1, lora_last_n=1, lora_layers="all_linear"
    )
    torch.manual_seed(0)
    base = build_hsam_network(cfg)
    model = copy.deepcopy(base)
    from hsam.build import apply_lora_and_freeze

    apply_lora_and_freeze(model, cfg)
    block = model.image_encoder.unit_module(model.first_trainable_unit)
    wrapped = {name for name, m in block.named_modules() if isinstance(m, LoRALinear)}
    # Attention output projection and both MLP layers; qkv keeps the paper's q/v-only LoRA.
    assert len(wrapped) == 3 and not any("qkv" in name for name in wrapped)
    assert isinstance(block.attn.qkv, LoRAQKV)
    trainable = [n for n, p in block.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 3  # only the last block
    model.eval()
    base.eval()
    x = torch.rand(1, 1, size, size)
    assert torch.equal(base.encode(x), model.encode(x))  # fresh LoRA (B = 0) changes nothing

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {
        name: (m.lora_b.weight @ m.lora_a.weight).detach().clone()
        for name, m in block.named_modules()
        if isinstance(m, LoRALinear)
    }
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    y = (x[:, 0] > 0.5).long()
    for _ in range(2):  # after the first step B != 0, so A receives gradient too
        F.cross_entropy(model(x, y).stage2_logits, y).backward()
        opt.step()
        opt.zero_grad()
    for name, m in block.named_modules():
        if isinstance(m, LoRALinear):
            delta = m.lora_b.weight @ m.lora_a.weight - before[name]
            assert (delta.abs().sum(1) > 0).all(), name  # every output feature adapted
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_all_linear_lora_checkpoint_round_trip(tmp_path):
    from hsam.config import ModelConfig, to_dict
    from hsam.io.checkpoint import load_checkpoint, save_checkpoint

    cfg = ModelConfig(
        backbone="tiny", image_size=64, num_classes=1, lora_rank=2, lora_layers="all_linear"
    )
    built = build_hsam(cfg, seed=3)
    with torch.no_grad():
        for name, p in built.model.named_parameters():
            if "lora_b" in name:
                p.add_(0.05)
    save_checkpoint(tmp_path / "c.pt", built, config={"model": to_dict(cfg)})
    loaded = load_checkpoint(tmp_path / "c.pt").built.model.eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(built.model.eval()(x).probabilities, loaded(x).probabilities)
    names = torch.load(tmp_path / "c.pt", weights_only=True)["state_dict"]
    assert any(".mlp." in n and "lora_a" in n for n in names)


def test_stage2_loss_reaches_stage1_logits_through_prior(tiny_cfg):
    model = build_hsam(tiny_cfg).model
    x, y = _batch(tiny_cfg)
    out = model(x, y)
    out.stage1_logits.retain_grad()
    F.cross_entropy(out.stage2_logits, y).backward()
    assert out.stage1_logits.grad is not None and out.stage1_logits.grad.abs().sum() > 0

    no_mask = build_hsam(dataclasses.replace(tiny_cfg, mask_attention=False)).model
    out = no_mask(x, y)
    out.stage1_logits.retain_grad()
    F.cross_entropy(out.stage2_logits, y).backward()
    # Without the prior, stage-1 logits feed only the fused output, not the stage-2 loss.
    assert out.stage1_logits.grad is None or out.stage1_logits.grad.abs().sum() == 0


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_cmattn_gate_and_gradient(tiny_cfg, mode):
    cfg = dataclasses.replace(tiny_cfg, cmattn=mode, class_noise_std=[0.1, 0.2, 0.3, 0.35])
    model = build_hsam(cfg).model
    x, y = _batch(cfg)
    out = model(x, y)
    F.cross_entropy(out.stage2_logits, y).backward()
    cmattn = model.stage2_decoder.cmattn
    grads = [p.grad for p in cmattn.parameters()]
    total = sum(0.0 if g is None else g.abs().sum().item() for g in grads)
    emb = model.encode(x)
    stage1 = model.mask_decoder(
        emb, model.prompt_encoder.dense_pe(), model.prompt_encoder.dense_embedding()
    )
    gate = cmattn.compute_gate(stage1.mask_features, emb.shape[-2:], y)
    if mode == "paper":
        assert total > 0
        assert gate.std() > 0  # varies over pixels and images
        assert ((gate > 0) & (gate < 1)).all()
    else:
        assert total == 0.0  # exactly zero: softmax over a size-1 dimension
        assert torch.equal(gate, torch.ones_like(gate))


def test_eval_disables_training_noise(tiny_cfg):
    cfg = dataclasses.replace(
        tiny_cfg,
        stage2_embedding_noise=0.2,
        stage2_dropout=0.2,
        class_noise_std=[0.35, 0.3, 0.2, 0.1],
    )
    model = build_hsam(cfg).model
    x, y = _batch(cfg)
    model.train()
    a, b = model(x, y), model(x, y)
    assert not torch.equal(a.stage2_logits, b.stage2_logits)
    model.eval()
    with torch.no_grad():
        a, b = model(x, y), model(x, y)
    assert torch.equal(a.stage2_logits, b.stage2_logits)
    assert torch.equal(a.probabilities, b.probabilities)


def test_logit_fusion_switch(tiny_cfg):
    model = build_hsam(dataclasses.replace(tiny_cfg, fuse="logits")).model.eval()
    x, _ = _batch(tiny_cfg)
    with torch.no_grad():
        out = model(x)
    up = F.interpolate(out.stage1_logits, size=out.stage2_logits.shape[-2:], mode="bilinear")
    assert torch.allclose(out.probabilities, ((up + out.stage2_logits) / 2).softmax(1), atol=1e-6)


def test_block_order_switch_changes_function(tiny_cfg):
    x, _ = _batch(tiny_cfg)
    outs = []
    for order in ("self_first", "cross_first"):
        model = build_hsam(dataclasses.replace(tiny_cfg, block_order=order), seed=3).model.eval()
        with torch.no_grad():
            outs.append(model(x).stage1_logits)
    assert outs[0].shape == outs[1].shape and not torch.allclose(outs[0], outs[1])


def test_class_noise_std_inverse_frequency():
    stds = class_noise_std_from_frequencies([0.9, 0.09, 0.01, 0.0], max_std=0.35)
    assert stds[2] == pytest.approx(0.35) and stds[3] == pytest.approx(0.35)
    assert stds[0] < stds[1] < stds[2]
    assert stds[0] == pytest.approx(0.35 * (0.01 / 0.9) ** 0.5)


def test_bad_inputs_are_rejected(tiny_cfg):
    model = build_hsam(tiny_cfg).model
    with pytest.raises(ValueError, match="image_size"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="B, 1 or 3"):
        model(torch.rand(1, 2, 64, 64))


def test_fused_attention_paths_agree():
    """SDPA (fp32), the explicit path (CPU bf16 / prior) and SAM's own Attention agree."""
    from segment_anything.modeling.transformer import Attention

    from hsam.modeling.attention import FusedAttention

    torch.manual_seed(0)
    sam = Attention(32, 4, downsample_rate=2)
    ours = FusedAttention(32, 4, downsample_rate=2)
    ours.load_state_dict(sam.state_dict())
    q, k = torch.randn(2, 5, 32), torch.randn(2, 40, 32)
    ref = sam(q, k, k)
    assert torch.allclose(ours(q, k, k), ref, atol=1e-5)
    ones = torch.ones(2, 5, 40)
    assert torch.allclose(ours(q, k, k, prior=ones), ref, atol=1e-5)  # prior 1 = plain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(ours(q, k, k).float(), ref, atol=3e-2)


@pytest.mark.slow
def test_frozen_encoder_statistics_never_change():
    """LiteMedSAM's TinyViT has BatchNorm: training must neither use batch statistics nor
    update the running ones (they are not in the checkpoint)."""
    from hsam.config import ModelConfig

    model = build_hsam(ModelConfig(backbone="litemedsam", image_size=256, num_classes=1)).model
    model.train()
    assert model.stage2_decoder.training and not model.image_encoder.training
    buffers = {k: v.clone() for k, v in model.image_encoder.named_buffers()}
    x = torch.rand(2, 1, 256, 256)
    out = model(x, (x[:, 0] > 0.5).long())
    F.cross_entropy(out.stage2_logits, (x[:, 0] > 0.5).long()).backward()
    for name, value in model.image_encoder.named_buffers():
        assert torch.equal(value, buffers[name]), name
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode(x), model.train().encode(x))


def test_test_input_size_resamples_slices_at_inference(tiny_cfg):
    import numpy as np

    from hsam.inference.slicewise import _slice_batches, predict_volume

    volume = np.random.default_rng(0).random((2, 64, 64), dtype=np.float32)
    ((_, direct),) = list(_slice_batches(volume, 64, 4, torch.device("cpu")))
    ((_, through),) = list(_slice_batches(volume, 64, 4, torch.device("cpu"), input_size=32))
    assert torch.equal(direct[:, 0], torch.from_numpy(volume))  # no resampling at S
    assert through.shape == direct.shape and not torch.allclose(through, direct)
    model = build_hsam(dataclasses.replace(tiny_cfg, test_input_size=32)).model
    labels, _ = predict_volume(model, volume)
    assert labels.shape == volume.shape


def test_first_trainable_unit_is_declared_and_set_by_build(tiny_cfg):
    # A bare network has a trainable encoder: no unit may be cached.
    assert build_hsam_network(tiny_cfg).first_trainable_unit == 0
    model = build_hsam(tiny_cfg, pretrained=False).model
    units = model.image_encoder.units()
    lora_units = [i for i, *_ in model.image_encoder.lora_targets()]
    assert 0 < model.first_trainable_unit == lora_units[0] < len(units)
    # Without LoRA the whole encoder is frozen: every unit is a cacheable prefix.
    frozen = build_hsam(dataclasses.replace(tiny_cfg, lora_last_n=0), pretrained=False).model
    assert frozen.first_trainable_unit == len(frozen.image_encoder.units())


def test_stage2_init_from_stage1_copies_transformer_and_upscaling(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, stage2_init="stage1")
    model = build_hsam(cfg).model
    stage1, stage2 = model.mask_decoder, model.stage2_decoder
    for part in ("transformer", "output_upscaling"):
        first = getattr(stage1, part).state_dict()
        second = getattr(stage2, part).state_dict()
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), part
    # Copies, not shared tensors: a step on stage 2 leaves stage 1 where it was.
    before = copy.deepcopy(stage1.transformer.state_dict())
    with torch.no_grad():
        next(stage2.transformer.parameters()).add_(1.0)
    after = stage1.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The default starts stage 2 from scratch, at full attention width (other shapes).
    copied = stage2.transformer.state_dict()
    random_stage2 = build_hsam(tiny_cfg).model.stage2_decoder.transformer.state_dict()
    assert any(random_stage2[k].shape != copied[k].shape for k in random_stage2)
    # A checkpoint's config rebuilds the same architecture: the state loads strictly.
    build_hsam(cfg, pretrained=False, seed=1).model.load_state_dict(model.state_dict())
