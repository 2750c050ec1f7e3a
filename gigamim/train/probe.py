"""`gigamim probe`: linear probe of a frozen encoder on labelled shards.

    gigamim probe --train SHARDS --val SHARDS [--weights PATH | --model NAME] [--stage K | --protocol simmim]
                  [--img-size N] [--window-size N] [--wd 1e-4] [--max-iter 300] [--out probe.json]

Features: the encoder in eval mode, no gradients; the (B, h, w, C) map of the final stage (or
of stage/block ``--stage K``, 0-based; for ViT K is a block index) average-pooled over space
(ViT: over the patch tokens); the images come from `data.loader.ClassificationLoader` in
eval mode (resize to S / 0.875 + centre crop S, every sample once). A linear classifier (multinomial logistic regression, L2
``--wd``) is fitted by full-batch L-BFGS on standardised training features; top-1/top-5 on
the held-out shards are printed as one JSON line (and written to ``--out``). Weights: a
consolidated SimMIM checkpoint, an exported encoder, a DeepSpeed checkpoint folder, or
none (random init of ``--model``). Labels come from each sample's ``.cls`` member.

``--protocol simmim``: the SimMIM paper's ViT linear probe (Table 6; the protocol as the
authors state it in microsoft/SimMIM issue #14): the output of the 8th block, average-pooled
over the patch tokens (not the [CLS] token), before any final LayerNorm.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from gigamim.data.errors import DataError


def stage_features(encoder: torch.nn.Module, x: torch.Tensor, stage: int | None = None) -> torch.Tensor:
    """(B, C) average-pooled features of the final normed map, or of stage ``stage``."""
    from gigamim.models.family import family_of

    spec = family_of(encoder)  # which stages (ViT: blocks) and how they are pooled
    n = spec.probe_depth(encoder)
    if stage is None or stage in (-1, n - 1):
        return encoder(x, features_only=True).mean(dim=(1, 2))
    if not -n <= stage < n:
        raise ValueError(f"--stage {stage} is out of range for this encoder ({n} {spec.probe_unit})")
    return spec.stage_features(encoder, x, stage % n)


@torch.no_grad()
def extract(encoder: torch.nn.Module, loader, stage: int | None = None, limit: int | None = None) -> tuple:
    """(fp64 features (N, C), labels (N,)) of one pass over a `ClassificationLoader` in eval
    mode: every sample once (padding repeats, `valid` False, are dropped), at most `limit`."""
    from gigamim.data.transforms import normalize_on_device

    encoder.eval()
    feats, labels, n = [], [], 0
    loader.set_epoch(0)
    batches = iter(loader)
    try:
        for _ in range(len(loader)):
            batch = next(batches)
            keep = batch["valid"]
            feats.append(stage_features(encoder, normalize_on_device(batch["image"]), stage)[keep])
            labels.append(batch["label"][keep])
            n += int(keep.sum())
            if limit is not None and n >= limit:
                break
    finally:
        batches.close()
    if not feats or n == 0:
        raise DataError("no labelled images were read")
    x, y = torch.cat(feats).double(), torch.cat(labels)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, wd: float = 1e-4,
               max_iter: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, fp64)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    z = (train_x - mean) / std
    lin = torch.nn.Linear(z.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(z), train_y) + 0.5 * wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    # fold the standardisation into the layer: it then takes raw features
    with torch.no_grad():
        lin.weight.div_(std)
        lin.bias.sub_((lin.weight * mean).sum(1))
    return lin


def topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == y[:, None]).any(1).double().mean().item()


def probe(encoder: torch.nn.Module, train: tuple, val: tuple, stage: int | None = None, wd: float = 1e-4,
          max_iter: int = 300, num_classes: int | None = None) -> dict:
    """top-1 / top-5 of a linear probe; ``train``/``val``: (features, labels) from `extract`."""
    t0 = time.time()
    (ftr, ytr), (fva, yva) = train, val
    n_cls = num_classes or int(max(ytr.max(), yva.max())) + 1
    lin = fit_linear(ftr, ytr, n_cls, wd, max_iter)
    with torch.no_grad():
        lt, lv = lin(ftr), lin(fva)
    out = {"top1": topk(lv, yva, 1), "train_top1": topk(lt, ytr, 1),
           "n_train": len(ytr), "n_val": len(yva), "num_classes": n_cls, "feature_dim": ftr.shape[1],
           "stage": "final" if stage is None else stage, "seconds": round(time.time() - t0, 2)}
    if n_cls > 5:  # with 5 classes or fewer every label is in the top 5: no information
        out["top5"] = topk(lv, yva, 5)
    return out


def labelled_loader(shards: str, img_size: int, batch_size: int = 64, num_workers: int = 2):
    """One process's eval-mode `ClassificationLoader` (resize + centre crop, shard order)."""
    from gigamim.data.loader import ClassificationLoader

    return ClassificationLoader(shards, batch_size, img_size=img_size, train=False, num_workers=num_workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gigamim probe", description="Linear probe of a frozen encoder on labelled shards.")
    p.add_argument("--train", required=True, help="labelled training shards (index.json, brace pattern)")
    p.add_argument("--val", required=True, help="labelled held-out shards")
    p.add_argument("--weights", help="consolidated SimMIM checkpoint / exported encoder / DeepSpeed checkpoint "
                   "folder; omit for random init")
    p.add_argument("--model", help="model name (default: from the weights' recorded config)")
    p.add_argument("--img-size", type=int, help="default: the weights' recorded image size")
    p.add_argument("--window-size", type=int, help="default: the weights' recorded window")
    p.add_argument("--stage", type=int, help="features of this stage (ViT: block), 0-based; default: final")
    p.add_argument("--protocol", choices=("simmim",), help="simmim: the SimMIM paper's ViT probe (microsoft/SimMIM "
                   "issue #14): the 8th block's patch tokens, average-pooled, no [CLS], no final norm (= --stage 7)")
    p.add_argument("--wd", type=float, default=1e-4, help="L2 on the classifier weights")
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--limit", type=int, help="read at most this many samples per split")
    p.add_argument("--seed", type=int, default=0, help="random init seed (no --weights)")
    p.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction forward")
    p.add_argument("--num-workers", type=int, default=2, help="data loader worker processes")
    p.add_argument("--out", help="also write the result JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from gigamim.train.load_encoder import EncoderLoadError, build_encoder

    torch.manual_seed(args.seed)
    overrides = {k: v for k, v in (("img_size", args.img_size), ("window_size", args.window_size)) if v is not None}
    try:
        encoder, info = build_encoder(args.model, args.weights, overrides)
        if args.protocol == "simmim":
            from gigamim.models.family import family_of

            spec = family_of(encoder)  # the paper's protocol probes a block of a plain stack of blocks
            flat = spec.probe_unit == "blocks"
            if not flat or spec.probe_depth(encoder) < 8 or args.stage not in (None, 7):
                blocks = spec.probe_depth(encoder) if flat else "not a ViT, no"
                raise EncoderLoadError("--protocol simmim is the SimMIM paper's ViT probe (the 8th block, average-pooled "
                                       f"patch tokens, = --stage 7): not for {info['model']} ({blocks} blocks"
                                       f"{'' if args.stage is None else f', --stage {args.stage}'})")
            args.stage = 7
        features = {}
        for split, shards in (("train", args.train), ("val", args.val)):
            try:
                loader = labelled_loader(shards, encoder.img_size, args.batch_size, args.num_workers)
            except (ValueError, FileNotFoundError) as e:
                raise ValueError(f"--{split}: {e}") from None
            features[split] = extract(encoder, loader, args.stage, args.limit)
        result = probe(encoder, features["train"], features["val"], args.stage, args.wd, args.max_iter)
    except (EncoderLoadError, ValueError) as e:  # bad data is a ValueError too (data.errors.DataError)
        print(f"gigamim probe: error: {e}", file=sys.stderr)
        return 2
    result.update(info)
    line = json.dumps(result)
    print(line)  # stdout: the result, one JSON line (scripts read it); the summary goes to stderr
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(line + "\n")
    top5 = f", top-5 {result['top5']:.4f}" if "top5" in result else ""
    print(f"gigamim probe: {info['model']} ({info['weights']}), {result['stage']} stage features: linear probe "
          f"top-1 {result['top1']:.4f}{top5} on {result['n_val']} held-out images, {result['num_classes']} classes "
          f"(train top-1 {result['train_top1']:.4f} on {result['n_train']})"
          + (f"; result in {args.out}" if args.out else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
