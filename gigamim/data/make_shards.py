"""`gigamim make-shards`: images (folder tree, file list, existing shards, or synthetic) -> tar shards + index.json.

Output (deterministic for the same input and options):
  OUT/<prefix>-000000.tar ...   webdataset tar shards; member `<key>.<ext>` (original bytes
                                unless --resize-max-side re-encodes), `<key>.cls` (ASCII int) when
                                the source has classes
  OUT/index.json                {"shards": [{"url": "<prefix>-000000.tar", "num_samples": n}, ...], "total": N,
                                 "classes": [names]}   (classes only for labelled sources: ImageFolder
                                class folders in sorted order, `.cls` = the index into it; urls
                                relative to OUT; the loaders take this file as `shards`)
  OUT/make_shards_report.json   every input accounted for: `inputs` = `written` + skipped; `written`
                                = `written_unchanged` (original bytes) + converted (re-encoded or
                                renamed to the format's extension, by reason); each converted and
                                skipped input with its path, reason and what PIL said.
Every file under a source folder is an input, whatever its extension: images of any format
PIL reads are kept (formats the reader does not list, e.g. AVIF, are re-encoded as PNG; a
JPEG named `.jfif` is stored as `.jpg`), anything else is skipped as not_an_image.
Keys are `<input number, 8 digits>_<sanitised source name>`: unique by the number, readable
by the name, and safe: only [A-Za-z0-9_-] (no dots that readers split on, no slashes or `..`).
Tar headers carry fixed mtime/uid/gid/names/mode, inputs are sorted, and parallel
workers return results in input order, so the same input gives byte-identical shards.
Re-sharding copies every member of a sample except pickle-type ones (.pyd .pickle .pkl
.pth .pt), which are dropped unread; images are decoded once to check they are readable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

from gigamim.sizes import parse_size

from gigamim.data.tario import ShardError, iter_samples, pick_image

from gigamim.data.shard_sink import INDEX_NAME, REPORT_NAME, ShardSink, parallel_map, sanitize_key  # noqa: F401


# ----------------------------------------------------------------------------- sources

def _is_image(name: str) -> bool:
    """Named like an image PIL can read (used only to tell ImageFolder from flat layouts)."""
    from PIL import Image

    return "." in name and "." + name.rsplit(".", 1)[-1].lower() in Image.registered_extensions()


def scan_folder(root: str, layout: str = "auto") -> tuple[list[tuple[str, int | None, str]], list[str]]:
    """[(path, class or None, name for the key)] for EVERY file under root, class names.
    ImageFolder = no image at the top level: the top-level subfolder is the class (as
    torchvision's ImageFolder); files at the top level of an ImageFolder have no class."""
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in sorted(filenames)]
    rel = sorted(os.path.relpath(p, root) for p in files)
    if layout == "auto":
        images = [r for r in rel if _is_image(r)]
        layout = "imagefolder" if images and all(os.sep in r for r in images) else "flat"
    if layout == "imagefolder":
        classes = sorted({r.split(os.sep, 1)[0] for r in rel if os.sep in r})
        cid = {c: i for i, c in enumerate(classes)}
        return [(os.path.join(root, r), cid[r.split(os.sep, 1)[0]] if os.sep in r else None, r) for r in rel], classes
    return [(os.path.join(root, r), None, r) for r in rel], []


def read_file_list(path: str) -> list[tuple[str, int | None, str]]:
    """Lines `path` or `path<TAB>class` (class an int); '#' comments; relative paths are relative to the list."""
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            p, _, label = line.partition("\t")
            try:
                cls = int(label) if label.strip() else None
            except ValueError:
                raise ValueError(f"{path}:{n}: class {label!r} is not an integer") from None
            full = p if os.path.isabs(p) else os.path.join(base, p)
            out.append((full, cls, os.path.relpath(full, base) if not os.path.isabs(p) else p))
    return out


# PIL format -> the member ext the reader knows it by (tario.IMAGE_EXTS).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif",
               "PPM": "ppm", "JPEG2000": "jp2"}


def _prepare(data: bytes, ext: str, max_side: int | None, quality: int) -> tuple[bytes, str, str | None]:
    """Validate by decoding; returns (bytes, member ext, conversion reason or None for unchanged).
    Raises BadSample (reason, readable detail) when the data is not a usable image."""
    import io

    from PIL import Image

    from gigamim.data.transforms import decode_rgb, open_image

    img = open_image(data)
    fmt_ext = _FORMAT_EXT.get(img.format or "")
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(ext, ext)
    if max_side is None and fmt_ext is not None:
        decode_rgb(data, draft_size=(max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        return data, fmt_ext, (None if ext == fmt_ext else f"renamed_{ext or 'noext'}_to_{fmt_ext}")
    rgb, _ = decode_rgb(data)
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale))),
                         Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        rgb.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg", "resized"
    if fmt_ext is None:
        # A format PIL reads but the reader does not list (AVIF, QOI, ...): lossless PNG.
        buf = io.BytesIO()
        rgb.save(buf, format="PNG")
        return buf.getvalue(), "png", f"reencoded_{(img.format or 'unknown').lower()}_as_png"
    return data, fmt_ext, (None if ext == fmt_ext else f"renamed_{ext or 'noext'}_to_{fmt_ext}")


def _load_file(job):
    """Worker: (number, path, cls, name, max_side, quality) -> ("ok", sample, path, conversion) | ("skip", path, reason, detail)."""
    from gigamim.data.transforms import BadSample

    i, path, cls, name, max_side, quality = job
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return ("skip", path, "unreadable_file", f"{type(exc).__name__}: {exc.strerror or exc}")
    ext = path.rsplit(".", 1)[-1].lower() if "." in os.path.basename(path) else ""
    try:
        data, new_ext, conversion = _prepare(data, ext, max_side, quality)
    except BadSample as exc:
        detail = exc.detail or exc.reason
        return ("skip", path, exc.reason, f"{detail} (extension {'.' + ext if ext else 'none'}, {len(data)} bytes)")
    sample = {"__key__": f"{i:08d}_{sanitize_key(os.path.splitext(name)[0])}", new_ext: data}
    if cls is not None:
        sample["cls"] = str(cls).encode()
    return ("ok", sample, path, conversion)


def _load_sample(job):
    """Worker for re-sharding: (number, url, key, files, max_side, quality)."""
    from gigamim.data.transforms import BadSample

    i, url, key, files, max_side, quality = job
    where = f"{url}#{key}"
    if isinstance(files, str):
        return ("skip", where, files, "the sample has no members the reader keeps")
    found = pick_image(files)
    if found is None:
        return ("skip", where, "no_image", f"no image member among {sorted(files)}")
    ext, data = found
    head, _, last = ext.rpartition(".")
    try:
        data, new_last, conversion = _prepare(data, last, max_side, quality)
    except BadSample as exc:
        return ("skip", where, exc.reason, f"{ext}: {exc.detail or exc.reason}")
    sample = {"__key__": f"{i:08d}_{sanitize_key(key.rsplit('/', 1)[-1])}"}
    for e, v in files.items():
        if e != ext:
            sample[e] = v
    sample[f"{head}.{new_last}" if head else new_last] = data
    return ("ok", sample, where, conversion)


def _shard_jobs(urls, max_side, quality, report):
    i = 0
    for url in urls:
        errors: list[ShardError] = []
        for _, key, files in iter_samples(url, read_exts=None, on_error=errors.append):
            yield (i, url, key, files if files else "empty_sample", max_side, quality)
            i += 1
        for exc in errors:
            report.append({"path": url, "reason": exc.reason, "detail": exc.detail})


def _source_kind(src: str) -> str:
    if src.endswith(".json") or src.endswith(".tar") or "{" in src or src.startswith("pipe:") or "::" in src:
        return "shards"
    if os.path.isdir(src):
        return "shards" if os.path.exists(os.path.join(src, INDEX_NAME)) else "folder"
    if src.endswith(".txt"):
        return "list"
    raise FileNotFoundError(f"make-shards: source {src!r} is not a folder, a .txt file list, an index.json, "
                            f"a .tar / brace pattern / pipe: URL of shards")


def make_shards(src: str, out: str, *, max_count: int = 1000, max_size: int | None = None,
                resize_max_side: int | None = None, quality: int = 90, workers: int = 1, prefix: str = "shard",
                layout: str = "auto", progress: bool = True, overwrite: bool = False, shuffle_seed: int = 0) -> dict:
    """Write shards from `src` into `out`; returns the report dict (also written to OUT/make_shards_report.json)."""
    kind = _source_kind(src)
    skipped: list[dict] = []
    converted: list[dict] = []
    shard_errors: list[dict] = []   # whole shards (or their tails) that could not be read: not inputs
    classes: list[str] = []
    if kind in ("folder", "list"):
        entries, classes = scan_folder(src, layout) if kind == "folder" else (read_file_list(src), [])
        # A fixed-seed shuffle before writing: sorted ImageFolder order would put one or two
        # classes in each shard, and the reader's shuffle buffer cannot mix across a stream's
        # whole shard list. Deterministic: the same input still gives the same shards.
        random.Random(shuffle_seed).shuffle(entries)
        jobs = [(i, p, c, n, resize_max_side, quality) for i, (p, c, n) in enumerate(entries)]
        fn, total = _load_file, len(jobs)
    else:
        from gigamim.data.shardspec import resolve

        found = resolve(src)
        classes = found.classes or []
        jobs = _shard_jobs(found.urls, resize_max_side, quality, shard_errors)
        fn, total = _load_sample, None
    if kind != "shards" and not jobs:
        raise ValueError(f"make-shards: no files found in {src!r}")
    sink = ShardSink(out, max_count=max_count, max_size=max_size, prefix=prefix,
                     progress_total=(total or 0) if progress else None, overwrite=overwrite, classes=classes)
    inputs = 0
    with sink:
        for result in parallel_map(fn, jobs, workers):
            inputs += 1
            if result[0] == "ok":
                sink.write(result[1])
                if result[3] is not None:
                    converted.append({"path": result[2], "reason": result[3]})
            else:
                skipped.append({"path": result[1], "reason": result[2], "detail": result[3]})
                sink.skip()
    report = {"source": src, "source_kind": kind, "inputs": inputs, "written": sink.total,
              "written_unchanged": sink.total - len(converted), "converted": _by_reason(converted),
              "shards": len(sink.shards), "skipped": _by_reason(skipped), "converted_inputs": converted,
              "skipped_inputs": skipped, "shard_errors": shard_errors, "classes": classes,
              "options": {"max_count": max_count, "max_size": max_size, "resize_max_side": resize_max_side,
                          "quality": quality, "prefix": prefix, "layout": layout}}
    with open(os.path.join(sink.out_dir, REPORT_NAME), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    if sink.total == 0:
        raise ValueError(f"make-shards: every input from {src!r} was unreadable; see {os.path.join(sink.out_dir, REPORT_NAME)}")
    return report


def summary(report: dict, out: str) -> list[str]:
    """What `gigamim make-shards` did and where it wrote it, as printed lines."""
    def reasons(counts: dict) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in counts.items())

    classes = report.get("classes") or []
    named = f"{len(classes)} classes: {', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''}" if classes \
        else "no classes (unlabelled)"
    conv, skip = sum(report["converted"].values()), sum(report["skipped"].values())
    kept = [f"{report['written_unchanged']} unchanged"] + ([f"{conv} converted ({reasons(report['converted'])})"]
                                                         if conv else [])
    lines = [f"{report['inputs']} inputs: wrote {report['written']} samples in {report['shards']} shard(s) -> "
             f"{os.path.join(out, INDEX_NAME)} ({named})",
             "  " + ", ".join(kept) + "; " + (f"{skip} skipped ({reasons(report['skipped'])})" if skip else "none skipped")]
    if report.get("shard_errors"):
        lines.append(f"  {len(report['shard_errors'])} shard(s) unreadable in part (listed in the report)")
    lines.append(f"  details: {os.path.join(out, REPORT_NAME)}")
    return lines


def _by_reason(entries: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
    return dict(sorted(counts.items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gigamim make-shards",
        description="Write webdataset tar shards + index.json from a folder tree (ImageFolder or flat, recursive), "
                    "a .txt file list (`path` or `path<TAB>class` per line), existing shards (index.json, .tar, "
                    "brace pattern or pipe: URL; re-sharding), or synthetic images (--synthetic N).",
        epilog="examples:  gigamim make-shards /data/imagenet/train /data/shards --max-size 1GB --workers 8\n"
               "           gigamim make-shards --synthetic 2000 /tmp/synth",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="SRC OUT", help="source and output folder (only OUT with --synthetic)")
    p.add_argument("--synthetic", type=int, metavar="N", help="write N procedural images instead of reading SRC")
    p.add_argument("--image-size", type=int, default=256, help="side of synthetic images (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic images (default 0)")
    p.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-size", type=parse_size, default=None, help="bytes per shard, e.g. 500M, 1GB (default: no limit)")
    p.add_argument("--resize-max-side", type=int, default=None, metavar="N",
                   help="shrink images whose longer side exceeds N and re-encode as JPEG (default: keep original bytes)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding (default 90)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel decode/encode processes")
    p.add_argument("--prefix", default=None, help="shard file prefix (default: shard, or synth with --synthetic)")
    p.add_argument("--layout", choices=("auto", "imagefolder", "flat"), default="auto",
                   help="folder sources: imagefolder = top-level subfolder is the class (auto: when no image is at the top)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    want = 1 if args.synthetic is not None else 2
    if len(args.paths) != want:
        parser.error("expected OUT with --synthetic" if want == 1 else "expected SRC OUT")
    out = args.paths[-1]
    try:
        if args.synthetic is not None:
            from gigamim.data.synthetic import write_synthetic_shards

            if not args.overwrite and os.path.exists(os.path.join(out, INDEX_NAME)):
                raise FileExistsError(f"{os.path.join(out, INDEX_NAME)} exists; pass --overwrite to replace it")
            index = write_synthetic_shards(out, args.synthetic, image_size=args.image_size,
                                           samples_per_shard=args.max_count, seed=args.seed, workers=args.workers,
                                           max_size=args.max_size, prefix=args.prefix or "synth",
                                           progress=not args.no_progress)
            print(f"wrote {args.synthetic} synthetic images -> {index}")
            return 0
        report = make_shards(args.paths[0], out, max_count=args.max_count, max_size=args.max_size,
                             resize_max_side=args.resize_max_side, quality=args.quality, workers=args.workers,
                             prefix=args.prefix or "shard", layout=args.layout, progress=not args.no_progress,
                             overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"gigamim make-shards: error: {exc}", file=sys.stderr)
        return 2
    for line in summary(report, out):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
