#!/usr/bin/env python3
"""Read licence plates with the lprnet-edge Recognizer API.

On a device, with an artifact built by ``lprnet-edge build`` (numpy, OpenCV and the TVM
runtime only; no torch)::

    python examples/recognize_plates.py --artifact build/lprnet-rpi4 plates/

On a host with PyTorch, straight from the pretrained weights (``--weights PATH``, or found
through $LPRNET_EDGE_WEIGHTS, $LPRNET_EDGE_DATA or the cache filled by
``lprnet-edge weights download``)::

    python examples/recognize_plates.py "$LPRNET_EDGE_DATA/test/京PL3N67.jpg" --bench 50

Images are files or folders (every image inside). If a file name is a plate text
(``京PL3N67.jpg``, ``京PL3N67_2.jpg``), the read is compared with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lprnet_edge import LprnetEdgeError, Recognizer
from lprnet_edge.runtime.dataset import IMAGE_SUFFIXES, label_from_name


def image_paths(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", help="image files or folders of images")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--artifact", help="artifact directory built by `lprnet-edge build`")
    src.add_argument("--weights", help="PyTorch weights (host only; needs torch)")
    ap.add_argument("--bench", type=int, metavar="RUNS", default=0,
                    help="also time RUNS reads of the first image (batch 1)")
    args = ap.parse_args(argv)

    try:
        if args.artifact:
            rec = Recognizer.from_artifact(args.artifact)
        else:
            from lprnet_edge.model.reference import reference_recognizer  # host: needs torch

            rec = reference_recognizer(args.weights)
        paths = image_paths(args.images)
        if not paths:
            raise LprnetEdgeError("no images given (folders hold no *.jpg, *.png, ...)")
        results = rec.recognize(paths)  # a list in, a list of PlateResult out

        known = right = 0
        for path, res in zip(paths, results, strict=True):
            label = label_from_name(path)
            mark = ""
            if label and all(c in rec.charset.chars for c in label):
                known += 1
                right += res.text == label
                mark = "ok" if res.text == label else f"expected {label}"
            print(f"{path.name:<24} {res.text:<10} {res.confidence:6.3f}  {mark}")
        if known:
            print(f"{right}/{known} plates read exactly ({rec.backend_name} backend)")

        if args.bench:
            stats = rec.benchmark(paths[0], runs=args.bench, warmup=min(10, args.bench))
            print(f"latency p50 {stats['p50_ms']:.2f} ms  p90 {stats['p90_ms']:.2f} ms  "
                  f"p99 {stats['p99_ms']:.2f} ms  {stats['throughput_fps']:.1f} plates/s")
    except LprnetEdgeError as e:  # a user mistake: a message, not a traceback
        print(f"Error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
