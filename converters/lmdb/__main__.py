"""``python -m converters.lmdb``: inspect and convert SSD-Caffe LMDBs.

Commands::

    inspect  LMDB [--json OUT.json] [--labelmap FILE] [--strict]
    to-voc   LMDB OUT_DIR [--labelmap FILE] [--split trainval] [--boxes voc|continuous] [--strict]
    to-coco  LMDB OUT.json --images-dir DIR [--labelmap FILE] [--boxes voc|continuous] [--strict]
    from-voc ROOT LIST.txt OUT_LMDB --labelmap FILE [--encoded | --raw] [--encode-type jpg|png]
             [--resize-height H --resize-width W] [--shuffle --seed S] [--strict]

Outputs are written beside their final path and renamed when complete
(``--overwrite`` replaces an existing one).  Corrupt records are skipped and
listed at the end; ``--strict`` stops at the first, naming it.  Errors print one
line (``error: ...``) and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from toolkit.caffe.io import CaffeFormatError
from toolkit.data.errors import DatasetError


def _add_common(p: argparse.ArgumentParser, *, labelmap_required: bool = False) -> None:
    p.add_argument("--labelmap", type=Path, required=labelmap_required,
                   help="Caffe labelmap prototxt" + ("" if labelmap_required else " (default: the 20 VOC classes)"))
    p.add_argument("--strict", action="store_true", help="stop at the first corrupt record instead of skipping it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m converters.lmdb",
        description="Inspect and convert SSD-Caffe LMDBs of AnnotatedDatum records.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="decode every record: JSON, or a summary")
    p.add_argument("lmdb", type=Path, metavar="LMDB")
    p.add_argument("--json", type=Path, metavar="OUT.json", help="write every record as JSON (key order)")
    _add_common(p)

    for name, what in (("to-voc", "a VOC folder (JPEG + XML + ImageSets list)"),
                       ("to-coco", "COCO JSON plus an image folder")):
        p = sub.add_parser(name, help=f"write the LMDB as {what}")
        p.add_argument("lmdb", type=Path, metavar="LMDB")
        if name == "to-voc":
            p.add_argument("out", type=Path, metavar="OUT_DIR")
            p.add_argument("--split", default="trainval", help="name of the ImageSets/Main list (default trainval)")
        else:
            p.add_argument("out", type=Path, metavar="OUT.json")
            p.add_argument("--images-dir", type=Path, required=True, metavar="DIR", help="folder for the images")
        p.add_argument("--boxes", choices=("voc", "continuous"), default="voc",
                       help="how the normalized boxes map to pixels (default voc: convert_annoset's XML path)")
        p.add_argument("--jpeg-quality", type=int, default=95, help="for images that are not JPEG already")
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        _add_common(p)

    p = sub.add_parser("from-voc", help="write an LMDB as SSD's convert_annoset does")
    p.add_argument("root", type=Path, metavar="ROOT", help="folder the list's paths are relative to")
    p.add_argument("list", type=Path, metavar="LIST.txt", help="lines 'image_path xml_path'")
    p.add_argument("out", type=Path, metavar="OUT_LMDB")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--encoded", dest="encoded", action="store_true", default=None,
                   help="store image files (default)")
    g.add_argument("--raw", dest="encoded", action="store_false", help="store raw BGR pixels (channel-planar)")
    p.add_argument("--encode-type", choices=("jpg", "png"), default=None,
                   help="format of encoded records (default jpg: files of that type are stored as they are)")
    p.add_argument("--resize-height", type=int, default=0, metavar="H")
    p.add_argument("--resize-width", type=int, default=0, metavar="W")
    p.add_argument("--shuffle", action="store_true", help="shuffle the list (with --seed) before numbering keys")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_LMDB")
    _add_common(p, labelmap_required=True)
    return parser


def _run(args: argparse.Namespace) -> int:
    progress = not args.quiet
    if args.command == "inspect":
        from converters.lmdb.records import inspect_lmdb, summarize, write_json
        from toolkit.data.labelmap import read_labelmap

        labelmap = read_labelmap(args.labelmap) if args.labelmap is not None else None
        result = inspect_lmdb(args.lmdb, strict=args.strict, progress=progress and args.json is not None)
        if args.json is not None:
            write_json(result.entries, args.json)
            print(f"wrote {len(result.entries)} record(s) to {args.json}")
            if result.corrupt:
                print(f"skipped {len(result.corrupt)} corrupt record(s):", file=sys.stderr)
                for key, reason in result.corrupt.items():
                    print(f"  {key!r}: {reason}", file=sys.stderr)
        else:
            print("\n".join(summarize(args.lmdb, result, labelmap)))
        return 0

    if args.command in ("to-voc", "to-coco"):
        from converters.lmdb.export import format_report, lmdb_to_coco, lmdb_to_voc

        common = dict(labelmap=args.labelmap, box_convention=args.boxes, jpeg_quality=args.jpeg_quality,
                      strict=args.strict, overwrite=args.overwrite, progress=progress)
        if args.command == "to-voc":
            report = lmdb_to_voc(args.lmdb, args.out, split=args.split, **common)
            lines = format_report(report, "a VOC folder")
        else:
            report = lmdb_to_coco(args.lmdb, args.out, args.images_dir, **common)
            lines = format_report(report, f"COCO JSON (images in {args.images_dir})")
        print(lines[0])
        for line in lines[1:]:
            print(line, file=sys.stderr)
        return 0

    from converters.lmdb.annoset import AnnosetOptions, convert_annoset, format_report as annoset_report

    encoded = True if args.encoded is None else args.encoded
    if not encoded and args.encode_type is not None:
        raise ValueError("--encode-type applies to encoded records; it cannot be combined with --raw")
    options = AnnosetOptions(
        encoded=encoded, encode_type=args.encode_type or "jpg", resize_height=args.resize_height,
        resize_width=args.resize_width, shuffle=args.shuffle, seed=args.seed,
    )
    report = convert_annoset(args.root, args.list, args.out, args.labelmap, options, strict=args.strict,
                             overwrite=args.overwrite, progress=progress)
    lines = annoset_report(report)
    print(lines[0])
    for line in lines[1:]:
        print(line, file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status."""
    import lmdb

    args = get_args_parser().parse_args(argv)
    try:
        return _run(args)
    except (DatasetError, CaffeFormatError, ValueError, OSError, lmdb.Error) as exc:
        # Our errors name the file / record at fault; show that one line, not a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
