"""The model-family seam (issue 23): a family is one file in models/ plus its `FamilySpec`;
the rest of gigamim asks the spec.

References: a one-file toy family (tests/helpers/toy_family.py) that only registers through
`register_variants`; its modules called by hand (probe features); the weights on disk (export);
the source tree itself (no family switch outside models/)."""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from gigamim.config import ConfigError, load_config, validate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    from tests.helpers import toy_family  # registers toy_nano (once per process)

    return toy_family


def test_toy_family_trains_groups_probes_plans_and_exports_through_the_spec(toy, tmp_path, capsys):
    import dataclasses

    from gigamim.checkpoint import safetensors_io
    from gigamim.checkpoint.export import ExportError, export
    from gigamim.config import ModelConfig
    from gigamim.data.masking import MaskGenerator
    from gigamim.models import family_of, list_models
    from gigamim.models.build import build_simmim
    from gigamim.models.compile import default_block_classes
    from gigamim.models.init import meta_init_problem
    from gigamim.models.param_groups import layer_decay, layer_id_map, param_groups
    from gigamim.train.load_encoder import build_encoder
    from gigamim.train.probe import stage_features
    from gigamim.train.tasks import PretrainTask

    assert "toy_nano" in list_models() and family_of("toy_nano") is toy.TOY

    # Validated by the spec at config time: img 80 is no multiple of 32 (the old SwinV2-only
    # rule) but is of the toy's stride 16; mask cells must hold whole 8-px patches.
    sets = ["model.name=toy_nano", "model.img_size=80", "data.mask_patch_size=16"]
    cfg = load_config(None, sets)
    validate(cfg, check_files=False)
    for bad, key in (("model.img_size=72", "'model.img_size'"), ("data.mask_patch_size=12", "'data.mask_patch_size'")):
        with pytest.raises(ConfigError, match=key):
            validate(load_config(None, sets + [bad]), check_files=False)

    # Built and trained one SimMIM step as the trainer builds it, with layer-decay groups.
    torch.manual_seed(0)
    model = build_simmim(dataclasses.asdict(cfg.model), defaults=dataclasses.asdict(ModelConfig()))
    assert model.encoder_stride == 16 and model.encoder.img_size == 80
    assert "encoder.mask_token" in model.state_dict()
    ids = layer_id_map(model)
    assert ids["encoder.patch_embed.weight"] == 0 and ids["encoder.mask_token"] == 0
    assert ids["encoder.layers.1.blocks.0.fc1.weight"] == 2 and ids["decoder.0.weight"] == 3
    groups = param_groups(model, 0.05, layer_decay(0.5))
    scale = {g["group_name"]: g["lr_scale"] for g in groups}
    assert scale["decay_layer0"] == 0.125 and scale["decay_layer3"] == 1.0
    assert "encoder.mask_token" not in {n for n, p in model.named_parameters()
                                        if any(p is q for g in groups if g["weight_decay"] for q in g["params"])}
    masker, rng = MaskGenerator(80, 16, 8, 0.6), random.Random(0)
    masks = torch.from_numpy(np.stack([masker(rng) for _ in range(2)]))
    images = torch.randn(2, 3, 80, 80)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    loss = model(images, masks)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p)] == []  # every one trained
    assert PretrainTask(cfg).flops(model) == (None, None)  # no analytic count: the run logs mfu null

    # Probed: stage k's pooled features, against the modules called by hand.
    enc = model.encoder.eval()
    with torch.no_grad():
        ref0 = enc.layers[0](enc.patch_embed(images).permute(0, 2, 3, 1)).mean(dim=(1, 2))
        torch.testing.assert_close(stage_features(enc, images, 0), ref0)
        assert stage_features(enc, images).shape == (2, 32)
    with pytest.raises(ValueError, match=r"out of range for this encoder \(2 stages\)"):
        stage_features(enc, images, 5)

    # Planned through the spec (`ToySpec.plan_count`; nothing in gigamim/tools knows the toy): the
    # planner's saved bytes against what autograd saves in a real forward, its FLOPs against
    # torch's FlopCounterMode, its parameters against the built model's, and `gigamim plan` plans it.
    from torch.utils.flop_counter import FlopCounterMode

    from gigamim.tools import plan
    from gigamim.tools.memory import activation_bytes
    from gigamim.tools.model_facts import model_facts
    from gigamim_benchmarks.memory import SavedTensorBytes

    with SavedTensorBytes(model) as saved:
        model(images, masks)
    assert activation_bytes("toy_nano", 80, batch=2, dtype_bytes=4, attn="fused")["saved"] == pytest.approx(
        saved.total, rel=0.05)
    with FlopCounterMode(display=False) as counter:
        model.reconstruct(images[:1], masks[:1])
    facts = model_facts("toy_nano", 80)
    assert facts.forward_flops == counter.get_total_flops()
    assert facts.params == sum(p.numel() for p in model.parameters())
    assert plan.main(["--model", "toy_nano", "--img-size", "80", "--gpus", "2", "--gpus-per-node", "2",
                      "--gpu-mem", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("toy_nano @ 80 px:") and "recommended:" in out

    # Partitioned: its blocks are the units an engine shards; a meta build can be re-initialised.
    assert toy.ToyBlock in default_block_classes()
    with torch.device("meta"):
        assert meta_init_problem(build_simmim({"name": "toy_nano"})) is None

    # Exported: encoder weights (no mask token) that load back as toy_nano; no timm class.
    src = tmp_path / "consolidated.safetensors"
    safetensors_io.save(str(src), {k: v.contiguous() for k, v in model.state_dict().items()},
                        {"gigamim_config": cfg.dump()}, max_shard_size=None)
    export(str(src), str(tmp_path / "enc.safetensors"), fmt="encoder")
    sd, _ = safetensors_io.load(str(tmp_path / "enc.safetensors"))
    want = {k[len("encoder."):]: v for k, v in model.state_dict().items()
            if k.startswith("encoder.") and k != "encoder.mask_token"}
    assert sorted(sd) == sorted(want) and all(torch.equal(sd[k], want[k]) for k in want)
    loaded, info = build_encoder("toy_nano", str(tmp_path / "enc.safetensors"), {"img_size": 80})
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
    with pytest.raises(ExportError, match="family 'toy' has no timm counterpart: export it with --format encoder"):
        export(str(src), str(tmp_path / "timm.safetensors"), fmt="timm")


def test_validate_asks_the_family_one_line_errors():
    """Rules that were SwinV2's alone no longer refuse other families; a window that does not
    tile a stage, an argument the family does not take and an unknown name are ConfigErrors
    naming the key, raised by validate (before any process group)."""
    # ViT-B/16 at 208 px (13 x 16) with 16-px mask cells: refused by the old `img_size % 32`.
    validate(load_config(None, ["model.name=vit_base_patch16", "model.img_size=208", "data.mask_patch_size=16"]),
             check_files=False)
    cases = [
        (["model.window_size=7"], "config key 'model.window_size': img_size=192 with window_size=7: stage 0"),
        (["model.name=swinv2_tiniest"], "config key 'model.name': unknown model 'swinv2_tiniest'"),
        (["model.name=vit_base_patch16", "model.img_size=224", "model.window_size=7"],
         "config key 'model.window_size': window_size=7: vit_base_patch16 (vit) takes no 'window_size'"),
        (["model.pretrained_window_sizes=[12]"], "config key 'model.pretrained_window_sizes'"),
        (["model.sequential_stages=[4]"], "config key 'model.sequential_stages'"),
    ]
    for sets, message in cases:
        with pytest.raises(ConfigError) as err:
            validate(load_config(None, sets), check_files=False)
        assert message in str(err.value) and "\n" not in str(err.value), (sets, str(err.value))


def test_encoders_declare_mask_token_and_main_branch_norm():
    """The encoder declares its mask token (absent from the state dict until SimMIM asks for
    it) and every SwinV2 block its main-branch norm (Identity where the variant has none)."""
    from gigamim.models import SimMIM, create_model
    from gigamim.models.swinv2 import SwinTransformerV2Block

    for name in ("swinv2_nano", "swin_nano", "vit_nano_patch16"):
        enc = create_model(name)
        assert enc.mask_token is None and "mask_token" not in enc.state_dict()
        sim = SimMIM(enc)
        assert isinstance(enc.mask_token, nn.Parameter) and tuple(enc.mask_token.shape) == (1, 1, 1, enc.embed_dim)
        assert "encoder.mask_token" in sim.state_dict()
    with torch.device("meta"):
        giant = create_model("swinv2_huge")
    blocks = [m for m in giant.modules() if isinstance(m, SwinTransformerV2Block)]
    assert sum(isinstance(b.norm3, nn.LayerNorm) for b in blocks) == 3  # every 6th block of stage 2
    assert all(isinstance(b.norm3, (nn.LayerNorm, nn.Identity)) for b in blocks)


# Legitimate hasattr uses outside models/, none of them about a model family.
ALLOWED_HASATTR = {
    ("gigamim/train/optim.py", 'if hasattr(getattr(old_cfg, section, None), leaf):'),  # a config key
    ("gigamim/train/engines/fsdp2.py", 'full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm'),  # DTensor
    ("gigamim/train/engines/fsdp2.py", 'yield p.to_local().detach() if hasattr(p, "to_local") else p.detach()'),  # DTensor
    ("gigamim/checkpoint/zero_fp32.py", 'self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096'),
    ("gigamim/runtime/jit_builds.py", 'return hasattr(_cpp_extension(), "FileLock")'),  # torch's build-lock kind
    ("gigamim/checkpoint/zero_fp32.py", 'elif hasattr(t, "flat_groups") and hasattr(t, "partitioned_numel"):'),
}
# A family switch: a family attribute or key read from a model / arch, or a family name literal.
SWITCH = re.compile(r"""getattr\([^)]*["']family["']|\[["']family["']\]|(?<!models)\.family\b|["'](swinv2|swin|vit)["']""")


def test_no_family_switch_outside_models():
    out = subprocess.run(["grep", "-rn", r"family\b\|hasattr", "gigamim", "--include=*.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    hits = [line.split(":", 2) for line in out.splitlines() if not line.startswith("gigamim/models/")]
    hasattr_uses = {(path, code.split("  #")[0].strip()) for path, _, code in hits if "hasattr" in code}
    assert hasattr_uses == ALLOWED_HASATTR
    switches = [f"{p}:{n}: {c.strip()}" for p, n, c in hits if SWITCH.search(c)]
    assert switches == []
    # Nor by name: a family literal anywhere outside models/ (e.g. name.startswith("swinv2")).
    out = subprocess.run(["grep", "-rnE", r"""["'](swinv2|swin|vit)["']""", "gigamim", "--include=*.py"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert [line for line in out.splitlines() if not line.startswith("gigamim/models/")] == []


@pytest.mark.parametrize("name, size", [("swinv2_tiny", 256), ("swin_base", 192), ("vit_base_patch16", 224)])
def test_spec_geometry_and_counts_match_the_built_model(name, size):
    """What a planner reads from the spec, before building, against the model built on the meta
    device: tokens after embedding, the output map's stride, per-stage tokens and channels."""
    from gigamim.models import create_model, family_of
    from gigamim.models.registry import model_defaults

    spec = family_of(name)
    args = {**model_defaults(name), "img_size": size, **({"window_size": 8} if name == "swinv2_tiny" else {})}
    geo = spec.validate(args, mask_patch_size=32)
    with torch.device("meta"):
        enc = create_model(name, **{k: v for k, v in args.items() if k in ("img_size", "window_size")})
        x = torch.empty(1, 3, size, size)
        tokens = enc.patch_embed(x)
        out = enc(x, features_only=True)
    prefix = getattr(enc, "num_prefix_tokens", 0)
    assert geo.tokens_per_image == tokens[0, ..., 0].numel() + prefix
    assert geo.encoder_stride == size // out.shape[1] and geo.stage_dims[-1] == out.shape[-1]
    assert geo.patch_size == enc.patch_size and sum(geo.stage_tokens) > 0
    assert spec.count_parameters(enc) == sum(p.numel() for p in enc.parameters())


def test_swinv2_tiny_parameter_count_is_timms():
    from gigamim.models import family_of

    assert family_of("swinv2_tiny").count_parameters("swinv2_tiny") == 27_578_154  # timm, encoder only
