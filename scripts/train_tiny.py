"""Train the shipped tiny model from nothing: `python scripts/train_tiny.py vae [--steps N] [--out DIR]`.

Stages: `vae` (the procedural world's clips -> AutoencoderKLHunyuanVideo, small config), then
`transformer` (flow matching on FramePack's packed sections, with OUT/vae's encoder) and, at the same
time if you like, `decoder` (more training of OUT/vae's decoder alone, the encoder frozen, so the
transformer's latents stay valid). `timeline` fine-tunes a trained transformer (default: the shipped
one) on changing prompts, end frames and keyframes (train/timeline.py). `lora` trains the shipped LoRA on
the shipped transformer (a motion it never saw, train/lora.py) into OUT/lora.safetensors, and `lora-gate`
measures it (OUT/lora.safetensors, else the shipped one) and, with `--ship`, copies it into the package
with its record and gate. Seeded and resumable:
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
    parser.add_argument(
        "stage", choices=["vae", "decoder", "transformer", "timeline", "ship", "gates", "lora", "lora-gate"]
    )
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
    parser.add_argument("--clips", type=int, default=None, help="lora: diagonal clips to encode (default 240)")
    parser.add_argument("--scenes", type=int, default=None, help="lora-gate: held-out scenes (default 20)")
    parser.add_argument("--seed", type=int, default=None, help="lora-gate: the scenes' seed (default: held out)")
    parser.add_argument("--ship", action="store_true", help="lora-gate: copy the LoRA and its gate into the package")
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
    if args.stage == "lora":
        from diffusers import AutoencoderKLHunyuanVideo

        from framepack_turbo.models.random import build_models
        from framepack_turbo.train import lora, ship

        conditioning = build_models("tiny", skip=frozenset({"transformer", "vae"}))
        vae = AutoencoderKLHunyuanVideo.from_pretrained(ship.SHIPPED / "vae").eval()
        cfg = _with_overrides(lora.LoraTraining(), args)
        if args.clips:
            cfg = replace(cfg, clips=args.clips)
        args.out.mkdir(parents=True, exist_ok=True)
        _save_record(args.out, "lora", lora.train(args.out, conditioning, vae, ship.SHIPPED / "transformer", cfg))
    if args.stage == "lora-gate":
        from framepack_turbo.api import FramePack
        from framepack_turbo.train import lora

        path = args.out / "lora.safetensors"
        path = path if path.is_file() else lora.SHIPPED_LORA
        without = FramePack.load("tiny", device="cpu")
        with_lora = FramePack.load("tiny", device="cpu", loras=(str(path),))
        seed, count = args.seed or lora.LORA_SEED, args.scenes or lora.GATE_SCENES
        gate = {v: lora.lora_gate(with_lora, without, seed, count, variant=v) for v in ("inverted", "f1")}
        record_path = args.out / "lora_record.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if args.ship:
            lora.ship(path, record, gate)
        print(json.dumps({v: {k: x for k, x in g.items() if k != "cases"} for v, g in gate.items()}, indent=2))
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
