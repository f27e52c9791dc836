"""One entry point: ``trunet <command>`` (also ``python -m trunet`` and ``torchrun -m trunet``).

Commands (DESIGN.md section 6)::

    trunet phantom  --out DIR [--cases N] [--seed S] [--dicom]
    trunet train    --config C [--data PATH] [--run-dir DIR] [--resume [auto]] [key=value ...]
    trunet predict  --checkpoint CKPT --input FILE|DIR|DICOM-DIR|datalist.json --output DIR
                    [--output-format nifti dicom-seg] [options]
    trunet evaluate --pred DIR --ref DIR|datalist.json|ACDC-root --out DIR
    trunet plan     --config C [--vram-gb 40] [--headroom 0.1] [--out FRAGMENT.yaml]

Exit codes: 0 done; 2 a user error (:class:`trunet.errors.TrunetError`: one line on stderr, ``--debug``
shows the traceback), among them a run folder locked by another job; 74 a full disk
(:class:`~trunet.errors.DiskFullError`: the line names the file and the space needed); 128 + signal
(143 SIGTERM, 130 SIGINT) when ``train`` was stopped by a signal (after saving ``latest.pt`` once training
had begun). Each command imports its stage package when it runs (not at module level), so ``--help`` and a
config error are instant; nothing here imports lazily to dodge a circle.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trunet import __version__
from trunet.config import load_config
from trunet.errors import TrunetError

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = TrunetError.exit_code
EXIT_INTERRUPTED = 130
RESUME_HELP = (
    "continue the run in --run-dir from checkpoints/latest.pt; '--resume auto' continues where that "
    "checkpoint exists and starts fresh otherwise (the command a restarted job can run every time). "
    "train.epochs may change on resume: the learning-rate schedule is then rescaled to the new length, "
    "the rate becoming what a run started with the new train.epochs has at that step (it jumps up when "
    "the run is lengthened; the log says from what to what)"
)


def _cmd_phantom(args: argparse.Namespace) -> int:
    from trunet.data.phantom import write_phantom_dataset

    datalist = write_phantom_dataset(args.out, cases=args.cases, seed=args.seed, dicom=args.dicom)
    print(f"wrote {args.cases} phantom cases in ACDC layout to {args.out}; datalist: {datalist}"
          + (f"; DICOM cines under {args.out / 'dicom'}" if args.dicom else ""))
    return 0


def _resume_mode(args: argparse.Namespace) -> str:
    """``--resume`` -> ``always``, ``--resume auto`` -> ``auto``, none -> ``never``. A bare ``--resume``
    followed by an override (``--resume train.epochs=9``) swallows it as its value: it is given back."""
    value = args.resume
    if value in (None, "always", "auto"):
        return value or "never"
    if "=" in value:
        args.overrides.insert(0, value)
        return "always"
    raise TrunetError(f"--resume takes 'auto' or no value, got {value!r}")


def _cmd_train(args: argparse.Namespace) -> int:
    args.resume = _resume_mode(args)
    config = load_config(args.config, args.overrides)  # config errors first, before heavy imports
    from trunet.pipeline.planning import training_memory_bytes
    from trunet.pipeline.training import TrainingInterrupted, run_training

    if args.data is not None:
        config.data.root = str(args.data.resolve())
    try:
        run_training(config, run_dir=args.run_dir, resume=args.resume, config_path=args.config,
                     memory_estimate=training_memory_bytes)
    except TrainingInterrupted as exc:  # latest.pt is saved; 128 + signal so schedulers restart the job
        print(f"trunet train: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from trunet.pipeline.inference import run_prediction

    run_prediction(
        checkpoint=args.checkpoint,
        inputs=args.input,
        output_dir=args.output,
        device=args.device,
        overlap=args.overlap,
        sw_batch_size=args.sw_batch_size,
        tta=args.tta,  # None: the checkpoint's infer.tta
        postprocess=False if args.no_postprocess else None,  # None: the checkpoint's infer.postprocess
        repair_frames=False if args.no_repair_frames else None,  # None: the checkpoint's infer.repair_frames
        exclude_atrium=False if args.keep_atrium else None,  # None: the checkpoint's infer.exclude_atrium
        save_probabilities=args.save_probabilities,
        cpu_bf16=None if args.cpu_precision is None else args.cpu_precision == "bf16",
        output_formats=args.output_format,
        overwrite=args.overwrite,
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from trunet.pipeline.evaluation import run_evaluation

    run_evaluation(pred=args.pred, ref=args.ref, out_dir=args.out, classes=args.classes,
                   allow_missing=args.allow_missing, overwrite=args.overwrite)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from trunet.pipeline.planning import run_plan

    run_plan(config, vram_gb=args.vram_gb, headroom=args.headroom, out=args.out, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trunet",
        description="Time-resolved (4D) cardiac cine MRI segmentation: phantom data, training, "
        "sliding-window prediction, clinical evaluation and GPU memory planning.",
    )
    parser.add_argument("--version", action="version", version=f"trunet {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True

    p = sub.add_parser("phantom", help="write synthetic 4D cardiac cine cases (ACDC layout + datalist.json)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; existing cases are not overwritten)")
    p.add_argument("--cases", type=int, default=10, help="number of patients (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same cases (default: 0)")
    p.add_argument("--dicom", action="store_true",
                   help="also write each cine as DICOM MR (one series per slice) under OUT/dicom/<case>/, and "
                        "OUT/datalist_dicom.json whose images are those folders")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("train", help="train a time-resolved UNet (also under torchrun for several GPUs)")
    p.add_argument("--config", type=Path, required=True, help="YAML config, e.g. configs/demo.yaml")
    p.add_argument("--data", type=Path, default=None,
                   help="datalist JSON or ACDC-layout root; default: the config's data.root, else the built-in phantom")
    p.add_argument("--run-dir", type=Path, default=None, help="run folder (default: runs/<config name>-<time>)")
    p.add_argument("--resume", nargs="?", const="always", default=None, metavar="auto", help=RESUME_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.epochs=5")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="segment every frame of cine scans with a trained checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="RUN/checkpoints/best.pt")
    p.add_argument("--input", type=Path, required=True,
                   help="a 4D image file, a DICOM cine folder (or enhanced .dcm), a folder of one 3D file "
                        "per frame (named with the frame number), a folder of any of these, or a datalist "
                        "JSON")
    p.add_argument("--output", type=Path, required=True, help="output folder for <case>_seg.nii.gz")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: from the checkpoint)")
    p.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward pass (default: from the checkpoint)")
    tta = p.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="mirroring test-time augmentation (slower, smoother; default: the checkpoint's infer.tta)")
    tta.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time augmentation")
    p.add_argument("--no-postprocess", action="store_true", help="keep all components (default: largest per class)")
    p.add_argument("--no-repair-frames", action="store_true",
                   help="keep every frame as segmented (default: frames whose masks break from their neighbours, "
                        "spoilt frames, are interpolated from the nearest clean ones and logged)")
    p.add_argument("--keep-atrium", action="store_true",
                   help="keep basal LV cavity that is less than half enclosed by myocardium (default: it is "
                        "atrium, the SCMR basal-slice rule, and becomes background; the slices are logged)")
    p.add_argument("--save-probabilities", action="store_true", help="also write <case>_prob_<k>_<class>.nii.gz (float32, one 4D file per class)")
    p.add_argument("--cpu-precision", choices=["bf16", "float32"], default=None,
                   help="precision of the network on the CPU (default: bf16 where the CPU has bf16 instructions, "
                        "else float32)")
    p.add_argument("--output-format", nargs="+", choices=["nifti", "dicom-seg"], default=["nifti"],
                   help="nifti: <case>_seg.nii.gz (default); dicom-seg: for DICOM input, <case>_seg_dicom/, a DICOM "
                        "SEG series (one instance per cardiac frame) referencing the source images; both: list both")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier predictions in --output (refused otherwise)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="Dice/HD95, volumes, EF, mass and temporal consistency against references")
    p.add_argument("--pred", type=Path, required=True, help="folder of <case>_seg.nii.gz from predict")
    p.add_argument("--ref", type=Path, required=True,
                   help="reference labels: what train --data takes (an ACDC root such as ACDC/training or "
                        "its parent ACDC, a datalist JSON, a folder holding datalist.json) or a folder of "
                        "<case>_gt.nii.gz")
    p.add_argument("--out", type=Path, required=True, help="report folder (CSV, JSON, PNG figures)")
    p.add_argument("--classes", nargs="+", default=None,
                   help="class names by label value (default: background RV MYO LV)")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate the predicted cases when some references have no prediction "
                   "(refused otherwise)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier report in --out (refused otherwise)")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("plan", help="estimate training memory and choose the largest patch that fits a GPU")
    p.add_argument("--config", type=Path, required=True, help="YAML config, e.g. configs/default.yaml")
    p.add_argument("--vram-gb", type=float, default=40.0, help="GPU memory budget in GB (default: 40)")
    p.add_argument("--headroom", type=float, default=0.1, help="fraction of the budget kept free (default: 0.1)")
    p.add_argument("--out", type=Path, default=None, help="write the chosen values as a config fragment (YAML)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file (refused otherwise)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except TrunetError as exc:
        if args.debug:
            raise
        print(f"trunet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"trunet {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
