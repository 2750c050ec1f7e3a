"""Transforms and masks against independent references (torchvision, formulas)."""

import io
import math
import random

import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode, Normalize

from gigamim.data.masking import MaskGenerator
from gigamim.data.seeding import sample_rng
from gigamim.data.transforms import SimMIMTransform, normalize_on_device, rrc_params
from tests.test_data_helpers import image_bytes


@pytest.mark.parametrize("size,mpatch,ratio", [(192, 32, 0.6), (64, 32, 0.6), (224, 32, 0.75)])
def test_mask_counts_and_blocks(size, mpatch, ratio):
    gen = MaskGenerator(size, mpatch, 4, ratio)
    mask = gen(random.Random(0))
    side = size // 4
    assert mask.shape == (side, side) and mask.dtype == bool
    cells = (size // mpatch) ** 2
    scale = mpatch // 4
    assert mask.sum() == math.ceil(cells * ratio) * scale * scale   # SimMIM: 192 -> 22 of 36 cells
    blocks = mask.reshape(size // mpatch, scale, size // mpatch, scale)
    assert (blocks == blocks[:, :1, :, :1]).all()                 # constant on each 32-px cell
    assert (gen(random.Random(5)) == gen(random.Random(5))).all()


def test_mask_rejects_bad_sizes():
    with pytest.raises(ValueError, match="mask_patch_size=30"):
        MaskGenerator(192, 30, 4)


def test_rrc_params_ranges():
    rng = random.Random(1)
    for _ in range(300):
        top, left, h, w = rrc_params(200, 150, rng)
        assert 0 <= top and top + h <= 150 and 0 <= left and left + w <= 200
        frac = h * w / (200 * 150)
        assert 0.6 <= frac <= 1.0 + 1e-9


def test_crop_matches_torchvision_resized_crop():
    data = image_bytes(96, 80, seed=3)
    t = SimMIMTransform(64)
    for s in range(6):
        out, info = t(data, sample_rng("x", s))
        top, left, h, w, flip = info["params"]
        ref = TF.resized_crop(Image.open(io.BytesIO(data)).convert("RGB"), top, left, h, w, [64, 64],
                              InterpolationMode.BILINEAR, antialias=True)
        if flip:
            ref = TF.hflip(ref)
        ref = TF.pil_to_tensor(ref)
        assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
        # resize(box=) may use pixels just outside the box at the border; interior is identical.
        assert (out.float() - ref.float()).abs().mean() < 1.0
        assert (out[:, 4:-4, 4:-4].float() - ref[:, 4:-4, 4:-4].float()).abs().max() <= 1


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_finetune_crops_resample_as_timms_official_pipeline(interpolation):
    """The fine-tuning train crop resamples as timm's RandomResizedCropAndInterpolation with the
    official DATA.INTERPOLATION (bicubic, the default): torchvision's resized_crop with timm's
    mode on the same crop box (the other filter differs by 3-13 levels inside)."""
    from timm.data.transforms import str_to_interp_mode

    from gigamim.data.transforms import ClassifyTransform

    data = image_bytes(96, 80, seed=3)
    t = ClassifyTransform(64, train=True, **({} if interpolation == "bicubic" else {"interpolation": interpolation}))
    for s in range(6):
        out, info = t(data, sample_rng("x", s))
        top, left, h, w, flip = info["params"]
        ref = TF.resized_crop(Image.open(io.BytesIO(data)).convert("RGB"), top, left, h, w, [64, 64],
                              str_to_interp_mode(interpolation), antialias=True)
        ref = TF.pil_to_tensor(TF.hflip(ref) if flip else ref)
        assert (out.float() - ref.float()).abs().mean() < 0.25
        assert (out[:, 4:-4, 4:-4].float() - ref[:, 4:-4, 4:-4].float()).abs().max() <= 1


def test_draft_path_close_to_full_decode():
    data = image_bytes(800, 640, seed=2, quality=95)
    a, _ = SimMIMTransform(96, use_draft=True)(data, sample_rng(1))
    b, _ = SimMIMTransform(96, use_draft=False)(data, sample_rng(1))
    assert (a.float() - b.float()).abs().mean() < 6.0


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA", "I;16", "LA", "1"])
def test_modes_become_rgb(mode):
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    out, info = SimMIMTransform(32)(image_bytes(48, 40, mode=mode, fmt=fmt), sample_rng(0))
    assert out.shape == (3, 32, 32) and info["converted"]


def test_16bit_scaled_not_clipped():
    out, _ = SimMIMTransform(32, scale=(1, 1), ratio=(1, 1))(image_bytes(32, 32, mode="I;16", fmt="PNG"), sample_rng(0))
    assert 0 < out.float().mean() < 250   # PIL's plain convert would give all-white


def test_normalize_on_device_matches_torchvision():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x.float() / 255)
    got = normalize_on_device(x, "cpu", torch.float32)
    assert torch.allclose(got, ref, atol=1e-5)
    assert normalize_on_device(x, "cpu", torch.bfloat16).dtype == torch.bfloat16


# -- the official fine-tuning augmentation (issue 22): timm's create_transform as the official
# loaders call it (microsoft/SimMIM data/data_finetune.py, microsoft/Swin-Transformer data/build.py)
# with the AUG.* / DATA.INTERPOLATION defaults of both official config.py files.
OFFICIAL_TRAIN = dict(is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                      re_mode="pixel", re_count=1, interpolation="bicubic")


def _seed_globals(seed: int) -> None:
    """What the reference pipeline's RNGs are set to for one sample (Python, numpy, torch CPU)."""
    import numpy as np

    random.seed(seed)
    np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
    torch.manual_seed(seed)


def test_randaugment_and_erasing_equal_timms_official_pipeline_with_the_same_draws():
    """gigamim's train view (crop + flip in the worker, RandAugment on the PIL crop, normalise,
    then erasing per sample) equals timm's official pipeline applied to the same crop with each
    sample's seeds: the RandAugment image bit for bit, the erased normalised tensor to float
    rounding (gigamim normalises as (x - 255 mean) / 255 std)."""
    import numpy as np
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing

    from gigamim.data.transforms import ClassifyTransform, random_erasing

    ref = create_transform(64, **OFFICIAL_TRAIN).transforms
    # RRC, flip, RandAugment, ToTensor, Normalize, RandomErasing: no ColorJitter with a policy set
    assert [type(t) for t in ref[2:3] + ref[5:]] == [RandAugment, RandomErasing] and len(ref) == 6
    plain = ClassifyTransform(64, train=True)
    ours = ClassifyTransform(64, train=True, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    data = image_bytes(96, 80, seed=3)
    changed = erased = 0
    for s in range(24):
        img, info = ours(data, sample_rng("ft", s))
        rng = sample_rng("ft", s)
        crop, _ = plain.apply(data, rng)            # the same crop draws; the seeds come after them
        aug_seed, erase_seed = rng.getrandbits(63), rng.getrandbits(63)
        assert info["erase_seed"] == erase_seed
        _seed_globals(aug_seed)
        want = ref[2](crop)
        assert torch.equal(img, torch.from_numpy(np.array(want)).permute(2, 0, 1))
        changed += not torch.equal(img, TF.pil_to_tensor(crop))
        want = ref[4](ref[3](want))
        before = want.clone()
        _seed_globals(erase_seed)
        want = ref[5](want)
        got = random_erasing(normalize_on_device(img[None]), torch.tensor([info["erase_seed"]]), 0.25, "pixel", 1)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
        erased += not torch.equal(want, before)
    assert changed >= 12          # RandAugment ran (timm applies each of its 2 ops with p 0.5: ~3/4 change)
    assert 0 < erased < 24        # p = 0.25: some erased, not all (the rate is checked below)


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "v0"])
def test_posterize_at_full_strength_keeps_zero_bits(policy):
    """timm's Posterize op at the level where it keeps 0 bits (reached by the official policy's
    magnitude noise) gives the black image older Pillow gave, where Pillow >= 11 raised from a
    DataLoader worker; other bit counts are Pillow's posterize. Reference: the bit mask in numpy."""
    import numpy as np

    from gigamim.data.transforms import auto_augment_transform

    aug = auto_augment_transform(policy, 64)
    ops = list(getattr(aug, "ops", [])) + [op for sub in getattr(aug, "policy", []) for op in sub]
    posterizes = [op for op in ops if op.name.startswith("Posterize")]
    assert posterizes, [op.name for op in ops]
    img = Image.open(io.BytesIO(image_bytes(64, 48, seed=5))).convert("RGB")
    for bits in (0, 1, 3):
        want = np.array(img) & ((0xFF << (8 - bits)) & 0xFF)
        got = np.array(posterizes[0].aug_fn(img, bits))
        assert np.array_equal(got, want), bits


def test_random_erasing_rate_determinism_and_global_rngs_untouched():
    """Over 2000 images timm's p = 0.25 holds (binomial sd 0.01); the same seeds give the same
    boxes and noise; Python's, numpy's and torch's global streams are as they were."""
    import numpy as np

    from gigamim.data.transforms import random_erasing

    x = torch.randn(2000, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seeds = torch.randint(0, 2**62, (2000,), generator=torch.Generator().manual_seed(1))
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a = random_erasing(x.clone(), seeds, 0.25, "pixel", 1)
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])
    rate = (a != x).flatten(1).any(1).float().mean().item()
    assert abs(rate - 0.25) < 0.04, rate
    assert torch.equal(random_erasing(x.clone(), seeds, 0.25, "pixel", 1), a)
    assert torch.equal(random_erasing(x.clone(), None, 0.25, "pixel", 1), x)   # eval batches: no seeds


def test_eval_view_and_default_train_view_are_not_augmented():
    """RandAugment and erasing are train-only and off unless asked: the eval view (and a train
    view without them) draws no seeds, so earlier runs' crops are unchanged."""
    from gigamim.data.transforms import ClassifyTransform

    data = image_bytes(96, 80, seed=4)
    ev = ClassifyTransform(64, train=False, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    assert ev.auto_augment is None and ev.reprob == 0
    img, info = ev(data, sample_rng("e", 0))
    assert "erase_seed" not in info and torch.equal(img, ClassifyTransform(64, train=False)(data, sample_rng("e", 0))[0])
    rng = sample_rng("t", 1)
    ClassifyTransform(64, train=True)(data, rng)
    ref = sample_rng("t", 1)
    rrc_params(96, 80, ref, (0.08, 1.0))
    ref.random()
    assert rng.random() == ref.random()   # the plain train view drew only the crop and the flip


def test_loader_ships_per_sample_erase_seeds_independent_of_workers(tmp_path):
    """The train ClassificationLoader carries each sample's `erase_seed` (int64) next to its
    RandAugment'd image; 0 or 2 workers give the same images and seeds (they come from the
    sample's stream, not a worker's), an eval loader carries none."""
    from gigamim.data.loader import ClassificationLoader
    from tests.test_data_helpers import write_dataset

    index, _ = write_dataset(tmp_path, [5, 3], w=48, h=40)
    kw = dict(img_size=32, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)
    runs = []
    for workers in (0, 2):   # the order of samples depends on the worker count; a sample's view does not
        it = iter(ClassificationLoader(index, 4, num_workers=workers, **kw))
        batches = [next(it) for _ in range(2)]   # one epoch: all 8 samples
        assert all(b["erase_seed"].dtype == torch.int64 for b in batches)
        runs.append({k: (b["image"][i], int(b["erase_seed"][i])) for b in batches for i, k in enumerate(b["key"])})
    assert len(runs[0]) == 8 and runs[0].keys() == runs[1].keys()
    assert len({seed for _, seed in runs[0].values()}) == 8
    for k, (img, seed) in runs[0].items():
        assert torch.equal(img, runs[1][k][0]) and seed == runs[1][k][1]
    assert "erase_seed" not in next(iter(ClassificationLoader(index, 4, num_workers=0, train=False, **kw)))
