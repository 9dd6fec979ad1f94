"""Train the shipped tiny model from nothing: `python scripts/train_tiny.py vae [--steps N] [--out DIR]`.

Stages: `vae` (the procedural world's clips -> AutoencoderKLHunyuanVideo, small config), then
`transformer` (flow matching on FramePack's packed sections, with OUT/vae's encoder) and, at the same
time if you like, `decoder` (more training of OUT/vae's decoder alone, the encoder frozen, so the
transformer's latents stay valid). `timeline` fine-tunes a trained transformer (default: the shipped
one) on changing prompts, end frames and keyframes (train/timeline.py). Seeded and resumable:
re-running a stage continues from its last checkpoint in OUT/checkpoints/. `ship` copies the result
into the package (src/framepack_turbo/models/weights/tiny/) with a manifest and runs the quality gates.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path


def _with_overrides(cfg, args):
    """The stage's defaults with the command line's --steps / --save-every / --after-change-share where given."""
    given = {"steps": args.steps, "save_every": args.save_every, "after_change_share": args.after_change_share}
    return replace(cfg, **{k: v for k, v in given.items() if v is not None})


def _save_record(out: Path, stage: str, record: dict) -> None:
    """OUT/<stage>_record.json, which `ship` puts in the manifest; printed without the config."""
    (out / f"{stage}_record.json").write_text(json.dumps(record, indent=2))
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["vae", "decoder", "transformer", "timeline", "ship", "gates"])
    parser.add_argument("--out", type=Path, default=Path("training/tiny"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--save-every", type=int, default=None)
    parser.add_argument(
        "--start-from",
        type=Path,
        default=None,
        help="timeline: the transformer to fine-tune (default: the shipped one)",
    )
    parser.add_argument(
        "--after-change-share",
        type=float,
        default=None,
        help="timeline: the share of batches that are a section next to a prompt change (default 0)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "vae":
        from framepack_turbo.train import vae

        _save_record(args.out, "vae", vae.train(args.out, _with_overrides(vae.VaeTraining(), args)))
    if args.stage == "decoder":
        from framepack_turbo.train import vae

        _save_record(args.out, "decoder", vae.finetune_decoder(args.out, _with_overrides(vae.VaeTraining(), args)))
    if args.stage == "transformer":
        from diffusers import AutoencoderKLHunyuanVideo

        from framepack_turbo.models.random import build_models
        from framepack_turbo.train import transformer

        # The frozen conditioning: the tiny random text and image encoders (deterministic from their seeds).
        conditioning = build_models("tiny", skip=frozenset({"transformer", "vae"}))
        vae = AutoencoderKLHunyuanVideo.from_pretrained(args.out / "vae").eval()
        cfg = _with_overrides(transformer.TransformerTraining(), args)
        _save_record(args.out, "transformer", transformer.train(args.out, conditioning, vae, cfg))
    if args.stage == "timeline":
        import shutil

        from diffusers import AutoencoderKLHunyuanVideo

        from framepack_turbo.models.random import build_models
        from framepack_turbo.train import ship, timeline

        conditioning = build_models("tiny", skip=frozenset({"transformer", "vae"}))
        # The shipped VAE: its encoder made the latents the transformer was trained on; `ship` takes it from OUT.
        if not (args.out / "vae").is_dir():
            shutil.copytree(ship.SHIPPED / "vae", args.out / "vae")
        shipped = json.loads((ship.SHIPPED / "manifest.json").read_text())
        for name in ("vae", "decoder", "transformer"):  # the earlier stages' records, kept in the manifest
            if not (args.out / f"{name}_record.json").is_file() and name in shipped:
                (args.out / f"{name}_record.json").write_text(json.dumps(shipped[name], indent=2))
        vae = AutoencoderKLHunyuanVideo.from_pretrained(args.out / "vae").eval()
        cfg = _with_overrides(timeline.TimelineTraining(), args)
        start = args.start_from or ship.SHIPPED / "transformer"
        _save_record(args.out, "timeline", timeline.finetune(args.out, conditioning, vae, start, cfg))
    if args.stage == "ship":
        from framepack_turbo.api import FramePack
        from framepack_turbo.train import ship

        records = {
            name: json.loads((args.out / f"{name}_record.json").read_text())
            for name in ("vae", "decoder", "transformer", "timeline")
            if (args.out / f"{name}_record.json").is_file()
        }
        manifest = ship.ship(args.out, records)
        from framepack_turbo.train.vae import VaeTraining, evaluate

        fp = FramePack.load("tiny", device="cpu")  # the shipped files, as users load them
        manifest["vae_gate"] = {"bound_db": ship.VAE_PSNR_BOUND_DB, **evaluate(fp.bundle.vae, VaeTraining())}
        gates = {v: ship.direction_accuracy(fp, v, out_dir=args.out) for v in ("inverted", "f1")}
        ship.update_manifest(vae_gate=manifest["vae_gate"], direction_gate=gates)
        print(json.dumps({k: manifest[k] for k in ("bytes", "vae_gate")} | {"direction_gate": gates}, indent=2))
    if args.stage == "gates":  # the timeline gates of the shipped files (train/gates.py); may run beside `ship`'s
        from framepack_turbo.api import FramePack
        from framepack_turbo.train import gates, ship

        fp = FramePack.load("tiny", device="cpu")
        result = gates.timeline_gates(fp)
        ship.update_manifest(timeline_gate=result)
        print(json.dumps(gates.brief(result), indent=2))


if __name__ == "__main__":
    main()
