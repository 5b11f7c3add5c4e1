"""Loading SAM-layout weights strictly, pos-embed resizing, and hsam checkpoints."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from segment_anything.modeling import TwoWayTransformer as SamTwoWayTransformer

from hsam.apps.cli import main
from hsam.build import build_hsam
from hsam.config import to_dict
from hsam.errors import CheckpointError
from hsam.io.checkpoint import load_checkpoint, save_checkpoint
from hsam.io.weights import LITEMEDSAM_SHA256, read_state_dict
from hsam.modeling.transformer import TwoWayTransformer


def test_two_way_transformer_equals_sam_with_same_weights():
    torch.manual_seed(0)
    ours = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64)
    sam = SamTwoWayTransformer(depth=2, embedding_dim=32, num_heads=2, mlp_dim=64)
    ours.load_state_dict(sam.state_dict(), strict=True)
    emb, pe, tok = torch.randn(2, 32, 4, 4), torch.randn(1, 32, 4, 4), torch.randn(2, 5, 32)
    q1, k1 = ours(emb, pe, tok)
    q2, k2 = sam(emb, pe, tok)
    assert torch.allclose(q1, q2, atol=1e-5) and torch.allclose(k1, k2, atol=1e-5)


def test_tiny_official_layout_loads_with_resizing(tiny_cfg, tiny_sam_checkpoint, monkeypatch):
    import hsam.build as build_module
    from hsam.io.weights import WeightsIdentity

    # The tiny preset normally has no weights; route it through the SAM loader for this test.
    monkeypatch.setattr(
        build_module,
        "resolve_backbone_weights",
        lambda name, path: WeightsIdentity(name, str(tiny_sam_checkpoint), "x"),
    )
    cfg = dataclasses.replace(tiny_cfg, backbone_weights=str(tiny_sam_checkpoint))
    model = build_module.build_hsam_network(cfg)
    from hsam.io.weights import load_pretrained

    state = read_state_dict(tiny_sam_checkpoint)
    report = load_pretrained(model, state, source="tiny")
    assert "image_encoder.pos_embed" in report.resized
    assert "image_encoder.blocks.1.attn.rel_pos_h" in report.resized  # global block
    assert "image_encoder.blocks.0.attn.rel_pos_h" not in report.resized  # windowed block
    assert model.image_encoder.pos_embed.shape == (1, 4, 4, 32)
    loaded = model.state_dict()
    for key in (
        "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
        "mask_decoder.output_upscaling.0.weight",
        "mask_decoder.iou_token.weight",
        "prompt_encoder.no_mask_embed.weight",
        "image_encoder.blocks.0.attn.qkv.weight",
    ):
        assert torch.equal(loaded[key], state[key]), key
    assert set(report.loaded) | set(report.unused) == set(state)


def _tamper(path, tmp_path, fn):
    state = torch.load(path, weights_only=True)
    fn(state)
    out = tmp_path / "bad.pth"
    torch.save(state, out)
    return read_state_dict(out)


@pytest.mark.parametrize(
    "tamper,message",
    [
        (
            lambda s: s.pop("image_encoder.neck.0.weight"),
            "missing keys: image_encoder.neck.0.weight",
        ),
        (
            lambda s: s.__setitem__("image_encoder.extra.weight", torch.zeros(1)),
            "unexpected keys: image_encoder.extra.weight",
        ),
        (
            lambda s: s.__setitem__("mask_decoder.iou_token.weight", torch.zeros(1, 7)),
            "mis-shaped keys: mask_decoder.iou_token.weight",
        ),
    ],
)
def test_bad_backbone_weights_name_the_keys(
    tiny_cfg, tiny_sam_checkpoint, tmp_path, tamper, message
):
    from hsam.build import build_hsam_network
    from hsam.io.weights import load_pretrained

    state = _tamper(tiny_sam_checkpoint, tmp_path, tamper)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        load_pretrained(build_hsam_network(tiny_cfg), state, source="bad")


def test_missing_sam_checkpoint_says_what_to_do():
    from hsam.config import ModelConfig

    with pytest.raises(CheckpointError, match="backbone_weights"):
        build_hsam(ModelConfig(backbone="sam_vit_b", image_size=224))
    with pytest.raises(CheckpointError, match="does not exist"):
        build_hsam(ModelConfig(backbone="sam_vit_b", image_size=224, backbone_weights="/no.pth"))


def test_checkpoint_round_trip_and_strictness(tiny_cfg, tmp_path):
    built = build_hsam(tiny_cfg, seed=5)
    with torch.no_grad():
        for p in built.model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, built, config={"model": to_dict(tiny_cfg)}, meta={"epoch": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
    loaded = load_checkpoint(path)
    assert loaded.meta["epoch"] == 3
    x = torch.rand(1, 1, 64, 64)
    built.model.eval()
    loaded.built.model.eval()
    with torch.no_grad():
        assert torch.equal(built.model(x).probabilities, loaded.built.model(x).probabilities)

    payload = torch.load(path, weights_only=True)
    name = next(iter(payload["state_dict"]))
    for mutate, message in (
        (lambda sd: sd.pop(name), "missing keys"),
        (lambda sd: sd.__setitem__("stage2_decoder.bogus", torch.zeros(1)), "unexpected keys"),
        (lambda sd: sd.__setitem__(name, torch.zeros(3, 3, 3)), "mis-shaped keys"),
    ):
        bad = torch.load(path, weights_only=True)
        mutate(bad["state_dict"])
        torch.save(bad, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "bad.pt")

    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "corrupt.pt")


def test_info_json_matches_paper_parameter_count(capsys):
    args = [
        "info",
        "--backbone",
        "sam_vit_b",
        "--image-size",
        "512",
        "--num-classes",
        "8",
        "--lora-rank",
        "4",
        "--json",
    ]
    assert main(args) == 0
    info = json.loads(capsys.readouterr().out)
    total = info["parameters"]["total"]["total"]
    assert abs(total - 112.3e6) / 112.3e6 < 0.01  # paper Table 6
    assert info["parameters"]["lora"]["total"] == 12 * 4 * 768 * 4  # 4 C r per block

    assert main([*args, "--stages", "1"]) == 0
    samed = json.loads(capsys.readouterr().out)
    assert "stage2_decoder" not in samed["parameters"]
    assert (
        samed["parameters"]["total"]["total"]
        == total - info["parameters"]["stage2_decoder"]["total"]
    )


def test_info_on_checkpoint(tiny_cfg, tmp_path, capsys):
    built = build_hsam(tiny_cfg)
    save_checkpoint(tmp_path / "c.pt", built, config={"model": to_dict(tiny_cfg)})
    assert main(["info", "--checkpoint", str(tmp_path / "c.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["backbone"] == "tiny"


@pytest.mark.slow
def test_litemedsam_bundled_weights_load_with_every_key_matched():
    from hsam.config import ModelConfig
    from hsam.io.weights import UNUSED_CHECKPOINT_KEYS, litemedsam_weights_path

    built = build_hsam(ModelConfig(backbone="litemedsam", image_size=256, num_classes=3))
    assert built.weights.sha256 == LITEMEDSAM_SHA256
    state = read_state_dict(litemedsam_weights_path())
    report = built.load_report
    assert set(report.loaded) | set(report.unused) == set(state)
    assert not report.resized
    import re

    assert all(any(re.fullmatch(p, k) for p in UNUSED_CHECKPOINT_KEYS) for k in report.unused)
    model_state = built.model.state_dict()
    transformer_keys = [k for k in state if k.startswith("mask_decoder.transformer.")]
    assert transformer_keys
    for key in transformer_keys:
        assert torch.equal(model_state[key], state[key]), key
    x = torch.rand(1, 1, 256, 256)
    with torch.no_grad():
        out = built.model.eval()(x)
    assert out.stage1_logits.shape == (1, 4, 256, 256)
    assert out.stage2_logits.shape == out.probabilities.shape == (1, 4, 256, 256)


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 512])
def test_sam_vit_b_official_layout_random_weights(tmp_path, size):
    from segment_anything import sam_model_registry

    from hsam.config import ModelConfig

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_random.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    cfg = ModelConfig(
        backbone="sam_vit_b", image_size=size, num_classes=8, backbone_weights=str(path)
    )
    built = build_hsam(cfg)
    assert "image_encoder.pos_embed" in built.load_report.resized
    h = size // 16
    assert built.model.image_encoder.blocks[2].attn.rel_pos_h.shape[0] == 2 * h - 1
    with torch.no_grad():
        out = built.model.eval()(torch.rand(1, 1, size, size))
    assert out.stage1_logits.shape == (1, 9, 4 * h, 4 * h)
    assert out.stage2_logits.shape == out.probabilities.shape == (1, 9, size, size)


@pytest.mark.parametrize("name", ["sam_vit_l", "sam_vit_h"])
def test_vit_l_h_specs_match_segment_anything(name):
    """Our presets must build exactly segment-anything's encoders (key names and shapes)."""
    from segment_anything import sam_model_registry

    from hsam.build import build_hsam_network
    from hsam.config import ModelConfig

    with torch.device("meta"):
        theirs = sam_model_registry[name.removeprefix("sam_")]().image_encoder.state_dict()
        ours = build_hsam_network(ModelConfig(backbone=name, image_size=1024)).image_encoder
    ours_state = ours.state_dict()
    assert {k: v.shape for k, v in ours_state.items()} == {k: v.shape for k, v in theirs.items()}


def test_ctrl_c_inside_torch_save_stays_an_interrupt_and_leaves_nothing(tmp_path, monkeypatch):
    # torch.save's zip writer turns an interrupt into a RuntimeError on exit; the CLI needs the
    # KeyboardInterrupt back to stop with its one line.
    from hsam.io.checkpoint import atomic_torch_save

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.serialization, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []
