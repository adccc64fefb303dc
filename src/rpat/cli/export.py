"""``rpat export CKPT OUT.safetensors``: the evaluated model of an rpat checkpoint as a safetensors file with a
model card in its header (:mod:`rpat.evaluation.export`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..evaluation.export import export_safetensors
from .common import HelpFormatter

EXAMPLES_EXPORT = """\
examples:
  rpat export runs/pgdat_rpat/best.pt pgdat_rpat.safetensors
  rpat export runs/rebat/final.pt rebat.safetensors --overwrite    # the weight-averaged model
  rpat eval pgdat_rpat.safetensors --n-examples 1000                 # no --arch: the header says it

the header (strings): arch, num_classes, in_chans, input_range [0, 1], normalization (none or mean/std),
threat_norm, threat_eps (k/255), dataset, epoch, weights (averaged/online), metrics (JSON, percent) and
metrics_source (the report of this checkpoint beside it, eval_best.json / best.eval.json, else the held-out
numbers stored in it, said so), model_kwargs and config (JSON), model_sha256 (checked when rpat loads it).
A safetensors file holds raw tensors and strings only: loading it cannot run code. Needs the safetensors
package: pip install 'rpat[safetensors]'.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a checkpoint's evaluated model as .safetensors with a model card",
                       description="Write the evaluated model of an rpat checkpoint (the weight-averaged model "
                       "when the run averaged) to a .safetensors file, with arch, input range, normalization, "
                       "threat model and headline metrics (with their source) in its header.",
                       epilog=EXAMPLES_EXPORT, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="an rpat checkpoint: best.pt, final.pt, last.pt or epochs/epoch_NNNN.pt")
    p.add_argument("out", help="the file to write; must end in .safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    header = export_safetensors(args.checkpoint, args.out, overwrite=args.overwrite)
    metrics = json.loads(header["metrics"])
    shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()) or "no metrics"
    size = Path(args.out).stat().st_size / 2**20
    print(f"wrote {args.out} ({header['arch']}, {header['weights']} weights of epoch {header['epoch']}, "
          f"{header['threat_model']}, {size:.1f} MiB)")
    print(f"metrics: {shown} ({header['metrics_source']})")
    return 0
