"""`hsam` command line: thin handlers that parse arguments and call one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hsam.config import ModelConfig
from hsam.devices import PRECISIONS, configure_cpu_allocator
from hsam.errors import HSAMError
from hsam.inference.postprocess import POSTPROCESS_CHOICES
from hsam.inference.slicewise import TTA_TRANSFORMS
from hsam.inference.volume_check import DEFAULT_FACTOR

logger = logging.getLogger("hsam")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _count(text: str) -> int:
    """argparse type of a count that must be at least 1 (epochs, views)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _cmd_info(args: argparse.Namespace) -> int:
    from hsam.apps.info import format_info, model_info

    if args.checkpoint:
        from hsam.io.checkpoint import read_checkpoint

        payload = read_checkpoint(args.checkpoint)
        from hsam.config import from_dict

        cfg = from_dict(ModelConfig, payload["config"]["model"], "checkpoint config.model")
        info = model_info(cfg, resolve_weights=False)
        info["backbone_weights"]["sha256"] = payload["backbone"]["sha256"]
        info["checkpoint"] = {
            "path": args.checkpoint,
            **payload["versions"],
            "meta": payload["meta"],
        }
    else:
        cfg = ModelConfig(
            backbone=args.backbone,
            backbone_weights=args.backbone_weights,
            image_size=args.image_size,
            num_classes=args.num_classes,
            lora_rank=args.lora_rank,
            stages=args.stages,
            cmattn=args.cmattn,
        )
        info = model_info(cfg)
    sys.stdout.write((json.dumps(info, indent=2) if args.json else format_info(info)) + "\n")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from hsam.config import load_run_config
    from hsam.engine.trainer import run_training

    if args.resume and args.out is None:
        raise HSAMError("--resume needs --out RUN_DIR (the run to continue).")
    cfg = load_run_config(args.config, args.set)
    out = args.out or f"runs/{Path(args.config).stem}"
    result = run_training(cfg, out, resume=args.resume)
    logger.info("best checkpoint: %s", result.best_checkpoint)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from hsam.data import prepare
    from hsam.io.atomic import check_writable_folder

    # Before reading any data: the output is built beside dst, then moved into place.
    check_writable_folder(Path(args.dst).parent, "prepare output folder")
    result = prepare(
        args.format,
        args.src,
        args.dst,
        few_shot=args.few_shot,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    logger.info("prepared %s", result)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from hsam.apps.evaluate import evaluate_checkpoint

    summary = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        split=args.split,
        out_dir=args.out,
        stage=args.stage,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        nsd_tolerance_mm=args.nsd_tolerance,
        overwrite=args.overwrite,
        backbone_weights=args.backbone_weights,
        format=args.format,
        save_predictions=args.save_predictions,
        volume_factor=args.volume_factor,
        postprocess=args.postprocess,
        tta=args.tta,
        slice_smoothing=args.slice_smoothing,
    )
    mean = summary["policies"]["legacy"]["mean"]
    logger.info(
        "%d case(s): mean Dice %s, HD95 %s voxels (legacy policy); reports in %s",
        summary["n_cases"],
        mean["dice"]["mean"],
        mean["hd95"]["mean"],
        args.out,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from hsam.apps.predict import predict_files

    written = predict_files(
        args.checkpoint,
        args.inputs,
        args.output,
        stage=args.stage,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        probabilities=args.probabilities,
        overlay=args.overlay,
        overwrite=args.overwrite,
        backbone_weights=args.backbone_weights,
        volume_factor=args.volume_factor,
        postprocess=args.postprocess,
        tta=args.tta,
        slice_smoothing=args.slice_smoothing,
    )
    logger.info("wrote %d file(s) under %s", len(written), args.output)
    return 0


def _inference_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="hsam checkpoint (e.g. best.pt)")
    parser.add_argument(
        "--stage",
        default="fused",
        choices=("1", "2", "fused"),
        help="which output to use (default: fusion of both stages)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="auto: bf16 where the device has bf16 hardware, else fp32 (default fp32)",
    )
    parser.add_argument(
        "--backbone-weights", help="SAM checkpoint file if it moved since training (sha256 checked)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--postprocess",
        choices=POSTPROCESS_CHOICES,
        help="largest_component: each class keeps its largest 3-D connected component "
        "(labels only; default: the checkpoint's recipe, config inference.postprocess; none "
        "where it has none)",
    )
    parser.add_argument(
        "--tta",
        choices=tuple(TTA_TRANSFORMS),
        help="test-time augmentation: flip averages the probabilities over the identity, "
        "left-right, up-down and both flips of each slice, rot90 over its four quarter turns "
        "(4x slower; for models trained with those transforms: flip lowered Dice on ACDC for "
        "one trained without; default: the checkpoint's recipe, config inference.tta; none "
        "where it has none)",
    )
    parser.add_argument(
        "--slice-smoothing",
        type=float,
        metavar="SIGMA",
        help="average the class probabilities across neighbouring slices with a Gaussian of "
        "SIGMA slices before the argmax, for thin, near-isotropic slices (LA: 2 raised Dice on "
        "held-out scans; README 'Slice smoothing'); 0 = off (default: the checkpoint's recipe, "
        "config inference.slice_smoothing; 0 where it has none)",
    )
    parser.add_argument(
        "--volume-factor",
        type=float,
        default=DEFAULT_FACTOR,
        help="warn when a predicted structure's volume fraction is this many times below the "
        "smallest or above the largest seen in training (checkpoint meta); 0 turns it off "
        f"(default {DEFAULT_FACTOR:g})",
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from hsam.apps.demo import DemoSchedule, run_demo

    schedule = DemoSchedule()
    command = "hsam demo"
    if args.epochs is not None:
        schedule.epochs = args.epochs
        command += f" --epochs {args.epochs}"
    if args.views is not None:
        schedule.augmented_views = args.views
        command += f" --views {args.views}"
    result = run_demo(args.out, schedule=schedule, overwrite=args.overwrite, command=command)
    for name, s in result.scores.items():
        logger.info("%s: Dice %.2f%%, HD95 %.2f voxels", name, 100 * s["dice"], s["hd95_voxels"])
    logger.info("report: %s (%.0f s in all)", result.report, result.seconds["total"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsam",
        description="H-SAM: prompt-free SAM with hierarchical decoding for medical segmentation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameter counts and backbone identity of a model")
    info.add_argument("--checkpoint", help="an hsam checkpoint (overrides the options below)")
    info.add_argument(
        "--backbone",
        default="sam_vit_b",
        help="sam_vit_b | sam_vit_l | sam_vit_h | litemedsam | tiny",
    )
    info.add_argument("--backbone-weights", help="official SAM checkpoint file (sam_vit_*)")
    info.add_argument("--image-size", type=int, default=512, help="input side S")
    info.add_argument("--num-classes", type=int, default=8, help="foreground classes K")
    info.add_argument("--lora-rank", type=int, default=4)
    info.add_argument(
        "--stages", type=int, default=2, choices=(1, 2), help="2 = H-SAM, 1 = SAMed baseline"
    )
    info.add_argument("--cmattn", default="paper", choices=("paper", "reference", "off"))
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(handler=_cmd_info)

    train = sub.add_parser("train", help="train H-SAM from a YAML config")
    train.add_argument("config", help="run config (model / data / train sections)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="a.b=v",
        help="override a config value (repeatable), e.g. --set train.epochs=50",
    )
    train.add_argument("--out", help="run directory (default runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.set_defaults(handler=_cmd_train)

    evaluate = sub.add_parser("evaluate", help="Dice / HD95 / NSD of a checkpoint on a split")
    _inference_options(evaluate)
    evaluate.add_argument(
        "--data",
        help="run config YAML or dataset folder (default: the checkpoint's own data config)",
    )
    evaluate.add_argument("--format", help="dataset format when --data is a folder")
    evaluate.add_argument("--split", default="test", help="test | val | all | a list file")
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance, mm")
    evaluate.add_argument(
        "--save-predictions", action="store_true", help="also write the predicted label volumes"
    )
    evaluate.set_defaults(handler=_cmd_evaluate)

    predict = sub.add_parser("predict", help="segment NIfTI / MHA / NRRD / DICOM volumes")
    _inference_options(predict)
    predict.add_argument("inputs", nargs="+", help="files or folders")
    predict.add_argument("--output", required=True, help="output folder (or file, one input)")
    predict.add_argument(
        "--probabilities", action="store_true", help="also write per-class probabilities"
    )
    predict.add_argument("--overlay", action="store_true", help="also write PNG montages")
    predict.set_defaults(handler=_cmd_predict)

    prep = sub.add_parser("prepare", help="convert raw data to the training layout + splits")
    prep.add_argument("format", help="synapse | la | acdc | promise12 | nnunet")
    prep.add_argument("src", help="raw data folder")
    prep.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    prep.add_argument(
        "--few-shot", help="N cases, a fraction of slices (e.g. 0.1) or a standard split name"
    )
    prep.add_argument("--seed", type=int, default=None)
    prep.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier hsam prepare output at DST (anything else there is refused)",
    )
    prep.set_defaults(handler=_cmd_prepare)

    demo = sub.add_parser("demo", help="few-shot H-SAM vs SAMed on the bundled LA sample (CPU)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--epochs", type=_count, help="training epochs (default: the demo budget)")
    demo.add_argument(
        "--views", type=_count, help="cached augmented views per slice (default: the demo budget)"
    )
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo's outputs")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    # Keep freed activation memory in the process (CPU steps stop page-faulting it back in).
    configure_cpu_allocator()
    try:
        return args.handler(args)
    except HSAMError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is a user's choice, not a crash: one line, no traceback, the shell's code.
        hint = "; resume with --resume" if args.command == "train" else ""
        logger.error("interrupted%s", hint)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
