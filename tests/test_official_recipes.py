"""Every official SimMIM config as a packaged recipe, value for value.

``OFFICIAL`` is transcribed from the official YAML files (microsoft/SimMIM ``configs/`` at
0e71746; microsoft/Swin-Transformer ``configs/simmim/``), keys as written there; what a file
leaves out is the default of its repository's ``config.py`` (``DEFAULTS``). The Swin-B / Swin-L
800-epoch files exist in both repositories with the same values (one recipe each; see
``REPO``). The packaged recipe of each stem must carry the same values in gigamim's keys, and
its LR at every step of a shortened run (3 steps per epoch) must equal timm's scheduler built
from the official values the way the official ``lr_scheduler.py`` builds it, stepped as the
official training loop steps it.
"""

from __future__ import annotations

import pytest
import torch
from timm.scheduler.cosine_lr import CosineLRScheduler
from timm.scheduler.multistep_lr import MultiStepLRScheduler

from gigamim.config import load_config, validate
from gigamim.models import model_defaults
from gigamim.train.optim import lr_at

SWIN_B = {"EMBED_DIM": 128, "DEPTHS": [2, 2, 18, 2], "NUM_HEADS": [4, 8, 16, 32]}
SWIN_L = {"EMBED_DIM": 192, "DEPTHS": [2, 2, 18, 2], "NUM_HEADS": [6, 12, 24, 48]}
VIT_B = {"EMBED_DIM": 768, "DEPTH": 12, "NUM_HEADS": 12}
MULTISTEP = {"LR_SCHEDULER": {"NAME": "multistep", "GAMMA": 0.1, "MULTISTEPS": [700]}}
# The TRAIN values every official 800-epoch pretraining file and every fine-tuning file write alike
# (each file repeats them; here they are written once)
PT_800EP = dict(EPOCHS=800, WARMUP_EPOCHS=10, BASE_LR=1e-4, WARMUP_LR=5e-7, WEIGHT_DECAY=0.05, **MULTISTEP)
FT_100EP = dict(EPOCHS=100, WARMUP_EPOCHS=20, BASE_LR=1.25e-3, WARMUP_LR=2.5e-7, MIN_LR=2.5e-7, WEIGHT_DECAY=0.05)

# stem -> the file's own values (MODEL.TYPE, MODEL.DROP_PATH_RATE, the arch section, DATA.*, TRAIN.*, SIMMIM)
OFFICIAL = {
    "simmim_pretrain__swin_base__img192_window6__100ep": dict(
        TYPE="swin", DROP_PATH_RATE=0.0, ARCH={**SWIN_B, "WINDOW_SIZE": 6}, IMG_SIZE=192, MASK_PATCH_SIZE=32,
        MASK_RATIO=0.6, TRAIN=dict(EPOCHS=100, WARMUP_EPOCHS=10, BASE_LR=2e-4, WARMUP_LR=1e-6, MIN_LR=1e-5,
                                   WEIGHT_DECAY=0.05)),
    "simmim_finetune__swin_base__img192_window6__100ep": dict(
        TYPE="swin", DROP_PATH_RATE=0.1, ARCH={**SWIN_B, "WINDOW_SIZE": 6}, IMG_SIZE=192,
        TRAIN=dict(FT_100EP, LAYER_DECAY=0.9)),
    "simmim_finetune__swin_base__img224_window7__100ep": dict(
        TYPE="swin", DROP_PATH_RATE=0.1, ARCH={**SWIN_B, "WINDOW_SIZE": 7}, IMG_SIZE=224,
        TRAIN=dict(FT_100EP, LAYER_DECAY=0.9)),
    "simmim_pretrain__swin_base__img192_window6__800ep": dict(
        TYPE="swin", DROP_PATH_RATE=0.0, ARCH={**SWIN_B, "WINDOW_SIZE": 6}, IMG_SIZE=192, MASK_PATCH_SIZE=32,
        MASK_RATIO=0.6, TRAIN=PT_800EP),
    "simmim_finetune__swin_base__img224_window7__800ep": dict(
        TYPE="swin", DROP_PATH_RATE=0.1, ARCH={**SWIN_B, "WINDOW_SIZE": 7}, IMG_SIZE=224,
        TRAIN=dict(FT_100EP, LAYER_DECAY=0.8)),
    "simmim_pretrain__swin_large__img192_window12__800ep": dict(
        TYPE="swin", DROP_PATH_RATE=0.0, ARCH={**SWIN_L, "WINDOW_SIZE": 12}, IMG_SIZE=192, MASK_PATCH_SIZE=32,
        MASK_RATIO=0.6, TRAIN=PT_800EP),
    "simmim_finetune__swin_large__img224_window14__800ep": dict(
        TYPE="swin", DROP_PATH_RATE=0.2, ARCH={**SWIN_L, "WINDOW_SIZE": 14}, IMG_SIZE=224,
        TRAIN=dict(FT_100EP, LAYER_DECAY=0.7)),
    "simmim_pretrain__vit_base__img224__800ep": dict(
        TYPE="vit", DROP_PATH_RATE=0.1, ARCH={**VIT_B, "USE_APE": False, "USE_RPB": False, "USE_SHARED_RPB": True,
                                               "USE_MEAN_POOLING": False},
        IMG_SIZE=224, MASK_PATCH_SIZE=32, MASK_RATIO=0.6,
        TRAIN=PT_800EP),
    "simmim_finetune__vit_base__img224__800ep": dict(
        TYPE="vit", DROP_PATH_RATE=0.1, ARCH={**VIT_B, "USE_APE": False, "USE_RPB": True, "USE_SHARED_RPB": False,
                                               "USE_MEAN_POOLING": True},
        IMG_SIZE=224, TRAIN=dict(FT_100EP, LAYER_DECAY=0.65)),
    "simmim_pretrain__swinv2_base__img192_window12__800ep": dict(
        TYPE="swinv2", DROP_PATH_RATE=0.1, ARCH={**SWIN_B, "WINDOW_SIZE": 12}, IMG_SIZE=192, MASK_PATCH_SIZE=32,
        MASK_RATIO=0.6, NORM_TARGET={"ENABLE": True, "PATCH_SIZE": 47},
        TRAIN=PT_800EP),
    "simmim_finetune__swinv2_base__img224_window14__800ep": dict(
        TYPE="swinv2", DROP_PATH_RATE=0.1, ARCH={**SWIN_B, "WINDOW_SIZE": 14, "PRETRAINED_WINDOW_SIZES": [12, 12, 12, 6]},
        IMG_SIZE=224, TRAIN=dict(FT_100EP, LAYER_DECAY=0.75)),
}
# Which repository's code runs the file (its config.py defaults, its lr_scheduler.py):
# "simmim" (microsoft/SimMIM: cosine from step 0) or "swint" (Swin-Transformer: WARMUP_PREFIX True).
REPO = {stem: ("swint" if "swinv2" in stem else "simmim") for stem in OFFICIAL}
DEFAULTS = {  # both repositories' config.py (SimMIM 0e71746; Swin-Transformer main)
    "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6, "DROP_PATH_RATE": 0.1, "MIN_LR": 5e-6, "WARMUP_LR": 5e-7,
    "WEIGHT_DECAY": 0.05, "CLIP_GRAD": 5.0, "LAYER_DECAY": 1.0, "NORM_TARGET": {"ENABLE": False, "PATCH_SIZE": 47},
    "LR_SCHEDULER": {"NAME": "cosine", "GAMMA": 0.1, "MULTISTEPS": []},
    "VIT": {"PATCH_SIZE": 16, "INIT_VALUES": 0.1, "QKV_BIAS": True, "MLP_RATIO": 4},
    # the fine-tuning loader's timm create_transform (no official file overrides these)
    "AUG": {"AUTO_AUGMENT": "rand-m9-mstd0.5-inc1", "REPROB": 0.25, "REMODE": "pixel", "RECOUNT": 1},
    "INTERPOLATION": "bicubic",  # DATA.INTERPOLATION: the crops and the augmentation's ops
}
BATCH, STEPS_PER_EPOCH = 2048, 625  # 16 GPUs x 128; ImageNet-1k through the official loader
ALIASES = {"simmim_swinv2_base_192": "simmim_pretrain__swinv2_base__img192_window12__800ep"}


def _official(stem):
    o = OFFICIAL[stem]
    t = {"MIN_LR": DEFAULTS["MIN_LR"], "WARMUP_LR": DEFAULTS["WARMUP_LR"], "LAYER_DECAY": DEFAULTS["LAYER_DECAY"],
         **o["TRAIN"]}
    t["LR_SCHEDULER"] = {**DEFAULTS["LR_SCHEDULER"], **o["TRAIN"].get("LR_SCHEDULER", {})}
    return o, t


def _recipe(name):
    cfg = load_config(name)
    validate(cfg, check_files=False)
    return cfg


@pytest.mark.parametrize("name", sorted(OFFICIAL) + sorted(ALIASES))
def test_packaged_recipe_has_the_official_values(name):
    stem = ALIASES.get(name, name)
    o, t = _official(stem)
    cfg = _recipe(name)
    pretrain = "_pretrain__" in stem
    m = cfg.model
    arch = model_defaults(m.name)
    if o["TYPE"] == "vit":
        assert (arch["embed_dim"], arch["depth"], arch["num_heads"]) == (o["ARCH"]["EMBED_DIM"], o["ARCH"]["DEPTH"],
                                                                        o["ARCH"]["NUM_HEADS"])
        assert arch["use_abs_pos_emb"] == o["ARCH"]["USE_APE"] and arch["use_rel_pos_bias"] == o["ARCH"]["USE_RPB"]
        assert arch["use_shared_rel_pos_bias"] == o["ARCH"]["USE_SHARED_RPB"]
        assert arch["use_mean_pooling"] == o["ARCH"]["USE_MEAN_POOLING"]
        v = DEFAULTS["VIT"]
        assert (arch["patch_size"], arch["init_values"], arch["qkv_bias"]) == (v["PATCH_SIZE"], v["INIT_VALUES"],
                                                                               v["QKV_BIAS"])
    else:
        assert m.name.startswith(o["TYPE"] + "_")  # swin_* (V1, timm) or swinv2_*
        assert (arch["embed_dim"], list(arch["depths"]), list(arch["num_heads"])) == (
            o["ARCH"]["EMBED_DIM"], o["ARCH"]["DEPTHS"], o["ARCH"]["NUM_HEADS"])
        assert m.window_size == o["ARCH"]["WINDOW_SIZE"]
        assert (m.pretrained_window_sizes or None) == o["ARCH"].get("PRETRAINED_WINDOW_SIZES")
    assert m.img_size == o["IMG_SIZE"]
    assert m.drop_path_rate == o.get("DROP_PATH_RATE", DEFAULTS["DROP_PATH_RATE"])
    if pretrain:
        assert cfg.data.mask_patch_size == o.get("MASK_PATCH_SIZE", DEFAULTS["MASK_PATCH_SIZE"])
        assert cfg.data.mask_ratio == o.get("MASK_RATIO", DEFAULTS["MASK_RATIO"])
        nt = o.get("NORM_TARGET", DEFAULTS["NORM_TARGET"])
        assert cfg.data.norm_target is nt["ENABLE"]
        if nt["ENABLE"]:
            assert cfg.data.norm_target_patch == nt["PATCH_SIZE"]
    else:
        assert cfg.finetune.layer_decay == t["LAYER_DECAY"]
        ft = cfg.finetune
        assert (ft.auto_augment, ft.reprob, ft.remode, ft.recount) == tuple(DEFAULTS["AUG"].values())
        assert ft.interpolation == DEFAULTS["INTERPOLATION"]
    assert cfg.train.global_batch_size == BATCH and cfg.optim.lr_scaling == "linear"
    assert cfg.train.max_steps == t["EPOCHS"] * STEPS_PER_EPOCH
    assert cfg.optim.warmup_steps == t["WARMUP_EPOCHS"] * STEPS_PER_EPOCH
    assert (cfg.optim.lr, cfg.optim.warmup_lr, cfg.optim.min_lr) == (t["BASE_LR"], t["WARMUP_LR"], t["MIN_LR"])
    assert cfg.optim.weight_decay == t["WEIGHT_DECAY"] and cfg.train.grad_clip == DEFAULTS["CLIP_GRAD"]
    sched = t["LR_SCHEDULER"]
    assert cfg.optim.schedule == sched["NAME"]
    if sched["NAME"] == "multistep":
        assert cfg.optim.milestones == [e * STEPS_PER_EPOCH for e in sched["MULTISTEPS"]]
        assert cfg.optim.gamma == sched["GAMMA"]
    else:
        assert cfg.optim.warmup_prefix is (REPO[stem] == "swint")


def _official_lr_per_step(stem, steps_per_epoch):
    """timm's scheduler as the official build_scheduler makes it from the official values (LRs x
    batch / 512 as main_*.py scales them), read off the optimizer before each step and stepped
    with step_update(idx) after it."""
    _, t = _official(stem)
    scale = BATCH / 512.0
    base, warm, floor = t["BASE_LR"] * scale, t["WARMUP_LR"] * scale, t["MIN_LR"] * scale
    num_steps = int(t["EPOCHS"] * steps_per_epoch)
    warmup = int(t["WARMUP_EPOCHS"] * steps_per_epoch)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    s = t["LR_SCHEDULER"]
    if s["NAME"] == "cosine":
        prefix = REPO[stem] == "swint"
        sched = CosineLRScheduler(opt, t_initial=num_steps - warmup if prefix else num_steps, cycle_mul=1.0,
                                  lr_min=floor, warmup_lr_init=warm, warmup_t=warmup, cycle_limit=1,
                                  t_in_epochs=False, warmup_prefix=prefix)
    else:
        milestones = [i * steps_per_epoch for i in s["MULTISTEPS"]]
        # the official MultiStepLRScheduler decays at bisect_right(milestones, t); timm's at
        # bisect_right(decay_t, t + 1): decay_t = milestone + 1 is the same count
        sched = MultiStepLRScheduler(opt, decay_t=[m + 1 for m in milestones], decay_rate=s["GAMMA"],
                                     warmup_t=warmup, warmup_lr_init=warm, warmup_prefix=False, t_in_epochs=False)
    out = []
    for idx in range(num_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step_update(idx)
    return out


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_lr_at_every_step_of_a_shortened_run_equals_the_official_scheduler(name):
    spe = 3  # a shortened run: 3 steps per epoch (2400 steps for 800 epochs)
    _, t = _official(name)
    cfg = _recipe(name)
    # the recipe's steps, rescaled from its 625 steps per epoch to 3
    short = load_config(name, [f"train.max_steps={cfg.train.max_steps // STEPS_PER_EPOCH * spe}",
                               f"optim.warmup_steps={cfg.optim.warmup_steps // STEPS_PER_EPOCH * spe}",
                               f"optim.milestones={[m // STEPS_PER_EPOCH * spe for m in cfg.optim.milestones]}"])
    ref = _official_lr_per_step(name, spe)
    ours = [lr_at(k, short) for k in range(len(ref))]
    worst = max(abs(a - b) / b for a, b in zip(ours, ref))
    assert worst <= 1e-12, worst


# The convenience fine-tune recipes (README / docs commands) -> the official stem whose training values
# they carry; they differ only in precision / DeepSpeed template `auto`, the weights path, and (SwinV2)
# taking the pretraining windows from the weights. finetune_vit_base is timm's standard ViT-B/16 on the
# official ViT-B schedule (the paper's ViT is the official stem's vit_base_patch16_simmim_ft).
CONVENIENCE = {"finetune_swinv2_base": "simmim_finetune__swinv2_base__img224_window14__800ep",
               "finetune_swin_base": "simmim_finetune__swin_base__img224_window7__800ep",
               "finetune_swin_large": "simmim_finetune__swin_large__img224_window14__800ep",
               "finetune_vit_base": "simmim_finetune__vit_base__img224__800ep"}


@pytest.mark.parametrize("name", sorted(CONVENIENCE))
def test_convenience_finetune_recipe_says_what_its_official_stem_says(name):
    import dataclasses

    ours, official = _recipe(name), _recipe(CONVENIENCE[name])
    assert dataclasses.asdict(ours.optim) == dataclasses.asdict(official.optim)
    for section, skip in (("train", {"precision"}), ("finetune", {"weights"}),
                          ("model", {"name", "pretrained_window_sizes", "attn_impl"})):
        a, b = dataclasses.asdict(getattr(ours, section)), dataclasses.asdict(getattr(official, section))
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}, section
    assert (ours.train.precision, ours.deepspeed.config) == ("auto", "auto")
    if name == "finetune_vit_base":
        assert ours.model.name == "vit_base_patch16" and official.model.name == "vit_base_patch16_simmim_ft"
        import timm

        from gigamim.models import create_model

        with torch.device("meta"):  # timm's standard ViT-B/16: same keys and shapes, absolute positions
            vit, ref = create_model(ours.model.name, num_classes=1000), timm.create_model("vit_base_patch16_224")
        assert {k: v.shape for k, v in vit.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
        assert "pos_embed" in vit.state_dict()
    else:
        assert ours.model.name == official.model.name
