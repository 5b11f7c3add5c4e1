"""Fixtures and helpers shared by the test modules (which import nothing from each other):
the shared-data folder, tiny SAM and H-SAM checkpoints, synthetic volumes and dataset layouts."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import sys
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
import yaml
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch.nn import functional as F

from hsam.build import BuiltModel, build_hsam
from hsam.config import DataConfig, ModelConfig, TrainConfig, to_dict
from hsam.io.checkpoint import save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` (a script, not a package) as module `name`; yields it
    and forgets it afterwards (for a module-scoped fixture). It sits in ``sys.modules`` while
    loaded because dataclasses resolve annotations through it."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(name, None)


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (or ``$HSAM_SHARED_DATA``): the real data sets
    that tests skip without."""
    return Path(os.environ.get("HSAM_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a whole test module, restored after it: the tiny models are
    fastest single-threaded (and CI machines are small and shared). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(backbone="tiny", image_size=64, num_classes=3, lora_rank=2)


def official_layout_tiny_sam(pretrain_size: int = 128) -> Sam:
    """A SAM in segment-anything's own classes/key layout with the tiny preset's sizes,
    trained-resolution `pretrain_size` (so loading at 64 must resize pos-embed/rel-pos)."""
    grid = pretrain_size // 16
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=pretrain_size,
            patch_size=16,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=4,
            out_chans=32,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=2,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32,
            image_embedding_size=(grid, grid),
            input_image_size=(pretrain_size, pretrain_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    )


@pytest.fixture
def tiny_sam_checkpoint(tmp_path) -> Path:
    torch.manual_seed(1)
    sam = official_layout_tiny_sam()
    with torch.no_grad():
        for p in sam.parameters():
            p.normal_(0, 0.05)  # non-trivial values so equality checks mean something
    path = tmp_path / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path


MR_POLICY = "percentile[0.5,99.5]"
CT_POLICY = "ct_window[-125,275]"
IMAGE_SIZE = 64


# --------------------------------------------------------------------------------------------
# tiny checkpoints (test_prediction, test_evaluation, test_volume_check)
# --------------------------------------------------------------------------------------------
def synthetic_bright_batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slices in [0, 1]: dark noise, in 80 % of them a bright disc or box; label = image > 0.5."""
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    images = rng.uniform(0.0, 0.4, (n, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    for i in range(n):
        if rng.random() < 0.2:
            continue
        if rng.random() < 0.5:
            cy, cx = rng.uniform(8, IMAGE_SIZE - 8, 2)
            r = rng.uniform(3, 18)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            y0, x0 = rng.integers(0, IMAGE_SIZE - 8, 2)
            y1 = rng.integers(y0 + 6, min(y0 + 48, IMAGE_SIZE) + 1)
            x1 = rng.integers(x0 + 6, min(x0 + 48, IMAGE_SIZE) + 1)
            mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
            mask[y0:y1, x0:x1] = True
        images[i][mask] = rng.uniform(0.6, 1.0, int(mask.sum()))
    labels = (images > 0.5).astype(np.int64)
    return torch.from_numpy(images)[:, None], torch.from_numpy(labels)


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(1)[:, 1]
    t = (target == 1).float()
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


@functools.cache
def trained_bright_model(steps: int = 220) -> BuiltModel:
    """K = 1 tiny H-SAM trained to segment bright voxels (deterministic, ~7 s on one CPU).

    CE + soft Dice on both stages, AdamW with a one-cycle schedule; reaches Dice ~0.7 on
    held-out synthetic slices (the tiny random encoder limits it), plenty to locate a shape."""
    cfg = ModelConfig(backbone="tiny", image_size=IMAGE_SIZE, num_classes=1, lora_rank=2)
    built = build_hsam(cfg, seed=0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = built.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            x, y = synthetic_bright_batch(rng, 8)
            out = model(x)
            up = F.interpolate(out.stage1_logits, size=y.shape[-2:], mode="bilinear")
            loss = sum(
                F.cross_entropy(logits, y) + _soft_dice_loss(logits, y)
                for logits in (out.stage2_logits, up)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return built


def run_config(model_cfg: ModelConfig, data: DataConfig | None = None) -> dict:
    data = data or DataConfig()
    return {"model": to_dict(model_cfg), "data": to_dict(data), "train": to_dict(TrainConfig())}


def make_checkpoint(
    path: Path,
    *,
    num_classes: int = 1,
    policy: str | None = MR_POLICY,
    trained: bool = True,
    label_names: dict | None = None,
    data: DataConfig | None = None,
    extra_meta: dict | None = None,
) -> Path:
    """Save a tiny checkpoint: the bright-voxel model (K = 1) or an untrained K-class one."""
    if trained:
        assert num_classes == 1
        built = trained_bright_model()
    else:
        cfg = ModelConfig(
            backbone="tiny", image_size=IMAGE_SIZE, num_classes=num_classes, lora_rank=2
        )
        built = build_hsam(cfg, seed=3)
    cfg = ModelConfig(backbone="tiny", image_size=IMAGE_SIZE, num_classes=num_classes, lora_rank=2)
    names = label_names
    if names is None:
        names = {"0": "background", **{str(c): f"organ {c}" for c in range(1, num_classes + 1)}}
        if num_classes == 1:
            names = {"0": "background", "1": "sphere"}
    meta: dict = {"label_names": names, "epoch": 0, "metrics": {}}
    if policy is not None:
        meta["intensity_policy"] = policy
    meta.update(extra_meta or {})
    save_checkpoint(path, built, config=run_config(cfg, data), meta=meta)
    return path


BOX_SHAPE = (10, 48, 72)  # (D, H, W) = (k, j, i): all different: a transpose changes it
BOX = (slice(1, 5), slice(8, 26), slice(40, 66))  # off-centre: a flip along any axis misses it


def rotation(axis, angle_deg: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = math.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


OBLIQUE = rotation((1.0, 2.0, 0.5), 23.0) @ np.diag([1.0, -1.0, 1.0])  # rotation + reflection


def write_nifti(path: Path, vol_dhw: np.ndarray, affine: np.ndarray) -> Path:
    """Write a (D, H, W) array as NIfTI with nibabel: nibabel's (i, j, k) = array.T."""
    img = nib.Nifti1Image(np.ascontiguousarray(vol_dhw.T), affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def write_dicom_series(image: sitk.Image, folder: Path, uid: str) -> None:
    """One CT slice file per k index, with the tags GDCM needs to sort and place them."""
    folder.mkdir(parents=True)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        sl.SetMetaData("0008|0060", "CT")
        sl.SetMetaData("0020|000d", uid + ".1")
        sl.SetMetaData("0020|000e", uid + ".2")
        sl.SetMetaData("0008|0018", f"{uid}.3.{z + 1}")
        sl.SetMetaData("0020|0013", str(z + 1))
        sl.SetMetaData("0020|0037", orientation)
        pos = image.TransformIndexToPhysicalPoint((0, 0, z))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in pos))
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)


def ellipsoid_label(rng: np.random.Generator, width: int = 40) -> np.ndarray:
    """(6, 40, width) boolean ellipsoid at a random in-plane centre (width >= 16)."""
    zz, yy, xx = np.mgrid[:6, :40, :width]
    cy, cx = rng.integers(14, 26, size=2)
    cx = min(cx, width - 8)  # inside a narrower slice too
    return (((yy - cy) / 9.0) ** 2 + ((xx - cx) / 7.0) ** 2 + ((zz - 2.5) / 3.0) ** 2) <= 1


def write_nnunet_dataset(root: Path, n_cases: int = 3, seed: int = 0, width: int = 40) -> Path:
    """Small MR-like (6, 40, width) volumes with a bright ellipsoid labelled 1."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(n_cases):
        label = ellipsoid_label(rng, width)
        image = rng.normal(100, 10, size=label.shape) + 200 * label
        for arr, path in (
            (image.astype(np.float32), root / "imagesTr" / f"case{i}_0000.nii.gz"),
            (label.astype(np.uint8), root / "labelsTr" / f"case{i}.nii.gz"),
        ):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(img, str(path))
    meta = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "blob": 1},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def tiny_run_config(tmp_path: Path, **train) -> Path:
    data_root = tmp_path / "data"
    if not data_root.exists():
        write_nnunet_dataset(data_root)
    cfg = {
        "model": {"backbone": "tiny", "image_size": 64, "num_classes": 1, "lora_rank": 2},
        "data": {"format": "nnunet", "root": str(data_root), "val_cases": 1},
        "train": {
            "epochs": 3,
            "batch_size": 2,
            "max_steps_per_epoch": 2,
            "warmup_steps": 2,
            "val_every": 1,
            "base_lr": 0.001,
            "seed": 7,
            **train,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
