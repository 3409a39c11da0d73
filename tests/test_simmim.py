"""SimMIM: parameter count, mask generator, encoder masking, loss, init, schedule, learning, timm compatibility, and
the CLI end to end."""
import contextlib
import json
import math

import pytest
import torch

import simmim
from conftest import assert_encoder_matches_timm_beit, read_log, run_script
from common import UserError
from common.training import parse_config
from common.vit import count_params
from simmim import PRESETS, Config, MaskGenerator, SimMIM, simmim_lr
from test_mae import assert_exported_encoder_is_the_trained_one, assert_main_follows_the_recipe, recompute_monitors


def tiny_simmim(img_size=16, **kw):
    torch.manual_seed(0)
    return SimMIM(img_size, 4, "vit_nano", **kw)


def test_paper_parameter_count():
    """Trainable parameters of the official ViT-B/16 SimMIM pre-training model at 224 (reference A8)."""
    with torch.device("meta"):
        m = SimMIM(224, 16, "vit_base")
    assert count_params(m) == 86_256_720
    assert count_params(m.decoder) == 768 * 16 * 16 * 3 + 16 * 16 * 3  # the 1x1 conv head


# ------------------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("img,unit,patch,units,count", [(224, 32, 16, 49, 30), (192, 32, 16, 36, 22),
                                                        (192, 32, 4, 36, 22), (32, 4, 2, 64, 39), (32, 8, 4, 16, 10)])
def test_mask_exact_count_and_unit_structure(img, unit, patch, units, count):
    gen = MaskGenerator(img, unit, patch, 0.6)
    assert (gen.num_units, gen.mask_count) == (units, count)  # ceil(units x 0.6), as the official
    mask = gen(64, torch.Generator().manual_seed(0))
    s, side = unit // patch, img // unit
    assert mask.shape == (64, (img // patch) ** 2)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(mask.sum(1) == count * s * s)  # the same exact count for every image
    # every mask unit (s x s tokens) is entirely hidden or entirely visible
    blocks = mask.view(64, side, s, side, s).permute(0, 1, 3, 2, 4).reshape(64, side * side, s * s)
    assert torch.all(blocks.amin(-1) == blocks.amax(-1))
    assert torch.all(blocks[..., 0].sum(1) == count)


def test_mask_units_are_chosen_uniformly_and_deterministically():
    gen = MaskGenerator(224, 32, 16, 0.6)
    a = gen(2000, torch.Generator().manual_seed(1))
    assert torch.equal(a, gen(2000, torch.Generator().manual_seed(1)))  # same seed, same masks
    assert not torch.equal(a, gen(2000, torch.Generator().manual_seed(2)))
    assert not torch.equal(a[0], a[1])  # a new draw per image
    per_unit = a.view(2000, 7, 2, 7, 2)[:, :, 0, :, 0].reshape(2000, 49).mean(0)  # how often each unit is hidden
    assert torch.allclose(per_unit, torch.full((49,), 30 / 49), atol=0.05)  # std of each frequency ~ 0.011


def test_mask_rejects_bad_sizes():
    for size in (100, (96, 100), (100, 96)):  # either side of a rectangle too
        with pytest.raises(ValueError, match="not a multiple of the mask unit"):
            MaskGenerator(size, 32, 16, 0.6)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        MaskGenerator(192, 24, 16, 0.6)
    for bad in (["--img-size", "224", "--mask-patch-size", "24"], ["--img-size", "200", "--patch-size", "8"],
                ["--mask-ratio", "1.0"], ["--sched", "linear"], ["--epochs", "8", "--warmup-epochs", "8"]):
        with pytest.raises(UserError):
            parse_config(Config, PRESETS, ["--data", "imagenet", *bad])


def test_presets_keep_the_imagenet_mask_structure():
    """Every preset: a token grid of >= 8 a side in units of 2 x 2 tokens, about 60 % hidden."""
    for data, tokens, units, count in (("imagenet", 14, 49, 30), ("cifar10", 16, 64, 39), ("mnist", 16, 64, 39),
                                       ("stl10", 12, 36, 22), ("synthetic", 8, 16, 10)):
        cfg, _ = parse_config(Config, PRESETS, ["--data", data])
        gen = MaskGenerator(cfg.img_size, cfg.mask_patch_size, cfg.patch_size, cfg.mask_ratio)
        assert (cfg.img_size // cfg.patch_size, gen.scale, gen.num_units, gen.mask_count) == (tokens, 2, units, count)


# ----------------------------------------------------------------------------------------------- model and loss
def test_relative_position_index_non_square_by_hand():
    """2 x 3 token grid: tokens (0,0) (0,1) (0,2) (1,0) (1,1) (1,2); pair (a, b) uses entry
    (dr + 1) * 5 + (dc + 2) with dr = row_a - row_b, dc = col_a - col_b: 15 pair entries, then 15, 16, 17 for
    cls->token, token->cls, cls->cls. Checked on the SimMIM encoder's shared table lookup."""
    m = SimMIM((8, 12), 4, "vit_nano")
    table = m.encoder.rel_pos_bias.relative_position_bias_table
    assert table.shape == (18, 2)
    expected = torch.tensor([[7, 6, 5, 2, 1, 0],
                             [8, 7, 6, 3, 2, 1],
                             [9, 8, 7, 4, 3, 2],
                             [12, 11, 10, 7, 6, 5],
                             [13, 12, 11, 8, 7, 6],
                             [14, 13, 12, 9, 8, 7]])
    full = torch.empty(7, 7, dtype=torch.long)
    full[1:, 1:], full[0, :], full[:, 0], full[0, 0] = expected, 15, 16, 17
    assert torch.equal(m.encoder.rel_pos_bias.relative_position_index, full)
    with torch.no_grad():
        table.copy_(torch.arange(36, dtype=torch.float).view(18, 2))  # entry e, head h holds 2 e + h
    bias = m.encoder.rel_pos_bias()  # [H, 7, 7], what every block adds to its attention logits
    assert torch.equal(bias, torch.stack([2.0 * full, 2.0 * full + 1]))


def test_official_init():
    torch.manual_seed(0)
    m = SimMIM(32, 4, "vit_nano")  # D = 64, 2 blocks
    enc = m.encoder
    sigma_std = 0.02 * math.sqrt(1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2)))
    for name, w in [("qkv", enc.blocks[1].attn.qkv.weight), ("fc1", enc.blocks[0].mlp.fc1.weight),
                    ("patch", enc.patch_embed.proj.weight), ("cls", enc.cls_token), ("mask", m.mask_token)]:
        assert w.abs().max() <= 0.02, name  # truncated at +-1 sigma (a plain N(0, .02) reaches ~4 sigma here)
        if w.numel() > 1000:
            assert w.std().item() == pytest.approx(sigma_std, rel=0.05), name  # 0.0108: the +-1 sigma std
    for layer, block in enumerate(enc.blocks, start=1):  # fix_init_weight: divided by sqrt(2 l)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.std().item() * math.sqrt(2 * layer) == pytest.approx(sigma_std, rel=0.05)
            assert w.abs().max() <= 0.02 / math.sqrt(2 * layer) + 1e-7
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.gamma_2 == 0.1)
        assert torch.all(block.attn.q_bias == 0) and torch.all(block.attn.v_bias == 0)
        assert block.attn.qkv.bias is None  # q and v biases only
        assert torch.all(block.attn.proj.bias == 0) and torch.all(block.mlp.fc1.bias == 0)
    assert torch.all(enc.rel_pos_bias.relative_position_bias_table == 0)
    assert enc.pos_embed is None  # no absolute position embedding
    assert enc.blocks[0].norm1.eps == 1e-6
    assert m.decoder[0].weight.abs().max() > 0.05  # the head keeps PyTorch's default init (bound 1/sqrt(64))
    assert [b.drop_path.drop_prob for b in enc.blocks] == [0.0, pytest.approx(0.1)]  # linspace(0, 0.1, depth)


def test_hidden_pixels_do_not_reach_the_encoder():
    """The hidden patches' embeddings are replaced by the mask token: their pixels cannot change the output."""
    m = tiny_simmim().eval()
    gen = MaskGenerator(16, 8, 4, 0.6)
    mask = gen(2, torch.Generator().manual_seed(0))
    hidden = m.pixel_mask(mask)  # [B, 1, H, W]
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        _, rec = m(imgs, mask)
        _, rec_hidden_changed = m(imgs + 5 * torch.randn_like(imgs) * hidden, mask)
        _, rec_visible_changed = m(imgs + 5 * torch.randn_like(imgs) * (1 - hidden), mask)
    assert torch.equal(rec, rec_hidden_changed)
    assert not torch.allclose(rec, rec_visible_changed, atol=1e-3)


def test_feature_map_layout_without_masking():
    """With nothing hidden, forward_encoder is the encoder's (timm-checked) forward_features laid out as [B, D, h, w]
    with token i * w + j at (i, j); a 2 x 3 grid catches a swapped h and w."""
    torch.manual_seed(0)
    m = SimMIM((8, 12), 4, "vit_nano").eval()
    imgs = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        fmap = m.forward_encoder(imgs, torch.zeros(2, 6))  # [2, 64, 2, 3]
        tokens = m.encoder.forward_features(imgs)[:, 1:]  # [2, 6, 64]
    assert fmap.shape == (2, 64, 2, 3)
    assert torch.allclose(fmap[:, :, 1, 0], tokens[:, 3], atol=1e-6)
    assert torch.allclose(fmap.flatten(2).transpose(1, 2), tokens, atol=1e-6)


def test_loss_is_masked_l1_and_ignores_visible_pixels():
    m = tiny_simmim()
    mask = MaskGenerator(16, 8, 4, 0.6)(2, torch.Generator().manual_seed(0))  # 3 of 4 units hidden
    imgs = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        loss, rec = m(imgs, mask)
    assert rec.shape == imgs.shape
    hidden = m.pixel_mask(mask)  # [B, 1, H, W]
    assert hidden.sum() == 2 * 3 * 8 * 8  # 3 hidden units of 8 x 8 pixels per image
    assert m.forward_loss(imgs, rec + 10.0 * (1 - hidden), mask).item() == pytest.approx(loss.item(), abs=1e-6)
    assert m.forward_loss(imgs, rec + 0.5 * hidden, mask).item() > loss.item() + 0.1
    # official: sum |x - x_rec| over hidden (pixel, channel) / (hidden pixels + 1e-5) / 3 channels
    by_hand = (imgs - rec).abs()[hidden.expand(-1, 3, -1, -1) == 1].sum() / (hidden.sum() + 1e-5) / 3
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert loss.item() == pytest.approx((imgs - rec).abs()[hidden.expand(-1, 3, -1, -1) == 1].mean().item(), rel=1e-5)


def test_pixel_shuffle_head_puts_each_token_on_its_own_patch():
    """Token (i, j) of the feature map predicts exactly the pixels of patch (i, j)."""
    m = tiny_simmim()
    z = torch.zeros(1, 64, 4, 4)
    z[0, :, 1, 2] = torch.randn(64)  # only token (1, 2) differs from the others
    out = m.decoder(z) - m.decoder(torch.zeros(1, 64, 4, 4))  # [1, 3, 16, 16]
    changed = out.abs().sum(1)[0] > 0  # [16, 16]
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[4:8, 8:12] = True
    assert torch.equal(changed, expected)


# ------------------------------------------------------------------------------------------------------ schedule
def test_lr_schedule_multistep_and_cosine():
    cfg = Config(epochs=800, warmup_epochs=10, lr=4e-4, warmup_lr=2e-6, min_lr=4e-6)
    assert simmim_lr(0, cfg) == 2e-6  # warm-up starts at WARMUP_LR, not 0
    assert simmim_lr(5, cfg) == pytest.approx((2e-6 + 4e-4) / 2)
    assert simmim_lr(10, cfg) == simmim_lr(699.99, cfg) == 4e-4
    assert simmim_lr(700, cfg) == simmim_lr(799.9, cfg) == pytest.approx(4e-5)  # x0.1 at epoch 700 of 800
    cfg.epochs = 100  # the milestone scales with the run: 87.5 of 100
    assert simmim_lr(87.4, cfg) == 4e-4 and simmim_lr(87.5, cfg) == pytest.approx(4e-5)
    cfg.sched, cfg.epochs = "cosine", 800  # timm's cosine over the whole run, warm-up included
    assert simmim_lr(10, cfg) == pytest.approx(4e-6 + (4e-4 - 4e-6) * 0.5 * (1 + math.cos(math.pi * 10 / 800)))
    assert simmim_lr(400, cfg) == pytest.approx((4e-4 + 4e-6) / 2)
    assert simmim_lr(800, cfg) == pytest.approx(4e-6)


# ------------------------------------------------------------------------------------------------------ learning
def test_mask_generator_by_hand_non_square():
    """A 16 x 32 image, units of 8 px, patches of 4: a 2 x 4 grid of units of 2 x 2 tokens on a 4 x 8 token grid;
    ceil(8 x 0.6) = 5 units hidden (int() would give 4), those of the 5 smallest noises of the generator's draw."""
    gen = MaskGenerator((16, 32), 8, 4, 0.6)
    assert (gen.units, gen.scale, gen.mask_count) == ((2, 4), 2, 5)
    mask = gen(3, torch.Generator().manual_seed(5))
    noise = torch.rand(3, 8, generator=torch.Generator().manual_seed(5))
    expected = torch.zeros(3, 4, 8)
    for b in range(3):
        for u in noise[b].argsort()[:5].tolist():
            r, c = divmod(u, 4)  # unit (r, c) covers token rows 2r, 2r+1 and token columns 2c, 2c+1
            expected[b, 2 * r:2 * r + 2, 2 * c:2 * c + 2] = 1
    assert torch.equal(mask, expected.flatten(1))


def test_encoder_input_by_hand():
    """The first block gets [cls, patch embeddings with every hidden one replaced by the mask token] (no absolute
    position: the relative bias is the only position signal), and the feature map is norm(blocks(.)) without cls."""
    m = tiny_simmim(drop_path=0.0).eval()
    enc = m.encoder
    with torch.no_grad():
        m.mask_token.normal_()
        enc.cls_token.normal_()
        imgs = torch.randn(2, 3, 16, 16)
        mask = MaskGenerator(16, 8, 4, 0.6)(2, torch.Generator().manual_seed(0))
        seen = {}
        enc.blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
        fmap = m.forward_encoder(imgs, mask)
        patches = enc.patch_embed.proj(imgs).flatten(2).transpose(1, 2)  # [2, 16, 64]
        hidden = mask.bool().unsqueeze(-1)
        tokens = torch.where(hidden, m.mask_token.expand(2, 16, -1), patches)
        expected = torch.cat([enc.cls_token.expand(2, -1, -1), tokens], 1)
        assert torch.allclose(seen["x"], expected, atol=1e-6)
        x = expected
        for block in enc.blocks:
            x = block(x, enc.rel_pos_bias())
        assert torch.allclose(fmap.flatten(2).transpose(1, 2), enc.norm(x)[:, 1:], atol=1e-5)


def test_training_loss_masks_from_the_generator():
    """training_loss (what main() and bench.py call): MaskGenerator(img, unit, patch, ratio) of the config drawn from
    `generator`, then the model."""
    m = tiny_simmim(drop_path=0.0)
    cfg = Config(img_size=16, patch_size=4, mask_patch_size=8, mask_ratio=0.6)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        loss = simmim.training_loss(m, imgs, cfg, torch.Generator().manual_seed(7))
        mask = MaskGenerator(16, 8, 4, 0.6)(3, torch.Generator().manual_seed(7))
        assert loss.item() == pytest.approx(m(imgs, mask)[0].item(), rel=1e-6)
        other = simmim.training_loss(m, imgs, cfg, torch.Generator().manual_seed(8))
        assert loss.item() != pytest.approx(other.item(), rel=1e-4)


def test_reconstruction_grid_rows(tmp_path, monkeypatch):
    """save_reconstruction: the masks of seed 0; the prediction as it is (the target has no per-patch norm) and
    pasted into the hidden pixels only."""
    rows = {}
    monkeypatch.setattr(simmim, "save_image_grid", lambda r, path, caption, labels: rows.update(zip(labels, r)))
    m = tiny_simmim()
    imgs = torch.randn(2, 3, 16, 16)
    cfg = Config(img_size=16, patch_size=4, mask_patch_size=8, mask_ratio=0.6)
    simmim.save_reconstruction(m, imgs, cfg, tmp_path / "r.png", "t", contextlib.nullcontext())
    mask = MaskGenerator(16, 8, 4, 0.6)(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, rec = m.eval()(imgs, mask)
    hidden = m.pixel_mask(mask)
    assert torch.allclose(rows["prediction"], simmim.denormalize(rec), atol=1e-6)
    assert torch.allclose(rows["pasted"], simmim.denormalize(torch.where(hidden == 1, rec, imgs)), atol=1e-6)
    assert torch.allclose(rows["masked"], simmim.denormalize(imgs) * (1 - hidden) + 0.5 * hidden)  # hidden: grey


def test_official_defaults_and_presets():
    """The official ViT-B config (simmim_pretrain__vit_base__img224__800ep.yaml) as the defaults."""
    cfg, _ = parse_config(Config, PRESETS, ["--data", "imagenet"])
    assert (cfg.img_size, cfg.patch_size, cfg.mask_patch_size, cfg.mask_ratio) == (224, 16, 32, 0.6)
    assert (cfg.epochs, cfg.batch_size, cfg.blr, cfg.warmup_epochs, cfg.sched, cfg.lr_step_at) == \
        (800, 128, 1e-4, 10, "multistep", 0.875)
    assert (cfg.clip_grad, cfg.weight_decay, cfg.drop_path, cfg.layer_scale, Config.lr_batch_div) == \
        (5.0, 0.05, 0.1, 0.1, 512)
    recipe = simmim.FINETUNE["imagenet"]
    assert (recipe["schedule"], recipe["blr"], recipe["warmup_epochs"], recipe["layer_decay"], recipe["clip_grad"]) == \
        ("timm", 1.25e-3, 20, 0.65, 5.0)


def test_main_follows_the_recipe(tmp_path, monkeypatch, one_thread):
    """simmim.main(): RandomResizedCrop(0.67, 1; 3/4, 4/3) bilinear; 3 of 4 units hidden from the step's generator;
    lr from WARMUP_LR 5e-7 x 16 / 512 up over one epoch (2 steps), then the peak (the x0.1 step at 0.875 x 2 epochs
    is not reached); the two micro-steps of an update averaged; AdamW(0.9, 0.999), no decay on the cls token."""
    def hand_loss(model, imgs, seed):
        noise = torch.rand(8, 4, generator=torch.Generator().manual_seed(seed))
        units = torch.zeros(8, 4).scatter_(1, noise.argsort(1)[:, :3], 1.0).view(8, 2, 2)
        mask = units.repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1)  # [8, 16] tokens
        return model(imgs, mask)[0]
    warm = 5e-7 * 16 / 512
    assert_main_follows_the_recipe(
        simmim, tmp_path, monkeypatch, ["--model", "vit_nano", "--img-size", 16, "--patch-size", 4,
                                        "--mask-patch-size", 8, "--drop-path", 0], hand_loss,
        dict(crop_scale=(0.67, 1.0), crop_ratio=(3 / 4, 4 / 3), interpolation="bilinear"),
        lambda peak: [warm, warm, peak, peak], (0.9, 0.999), no_decay=("encoder.cls_token",))


def test_tiny_model_overfits_one_batch(one_thread):
    m = tiny_simmim(drop_path=0.0)
    torch.manual_seed(0)
    imgs = torch.randn(4, 3, 16, 16)
    mask = MaskGenerator(16, 8, 4, 0.6)(4, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss, _ = m(imgs, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # L1 falls like the square root of MSE: a factor 4 here is about MAE's factor 10 on its MSE
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])


def test_encoder_loads_into_timm_beit_with_same_features():
    assert_encoder_matches_timm_beit(tiny_simmim(img_size=32).encoder)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the CLI runs on one thread as this process does (same sums, same numbers)


def test_cli_end_to_end(tmp_path, tiny, one_thread):
    out = tmp_path / "run"
    # --blr 0.05 (lr 1.6e-3): 8 steps move the encoder far enough from its init that the monitors tell them apart
    run_script("simmim.py", *tiny, "--mask-patch-size", "8", "--warmup-epochs", "1", "--blr", "0.05", "--out", out,
               env=ONE_THREAD)
    for name in ("config.json", "log.jsonl", "checkpoint.pth", "encoder.pth", "recon_e0.png", "recon_e1.png",
                 "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "simmim" and results["global_step"] == 8  # 64 images / batch 16 x 2 epochs
    assert 0 < results["final_loss"] < 2
    # final_loss: the mean loss of the last epoch's 4 steps, as logged
    losses = [s["loss"] for s in read_log(out, "step")]
    assert results["final_loss"] == pytest.approx(sum(losses[4:]) / 4, rel=1e-6)
    assert results["final_loss"] < 0.95 * losses[0]  # the 8 steps learn (1.27 -> 1.11 here)
    assert read_log(out, "epoch")[-1]["loss"] == results["final_loss"]
    for which in ("pretrained", "random_init"):
        assert set(results["eval"][which]) == {"knn_cls", "knn_mean", "linear_cls", "linear_mean"}
        assert all(0 <= v <= 100 for v in results["eval"][which].values())
    # the numbers are those of the exported encoder and of the seed's initial encoder, computed again here
    assert results["eval"] == recompute_monitors(simmim, out)
    assert results["eval"]["pretrained"] != results["eval"]["random_init"]  # (so the line above tells them apart)
    assert_exported_encoder_is_the_trained_one(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "vit_nano" and cfg["mask_patch_size"] == 8
    assert cfg["lr"] == pytest.approx(cfg["blr"] * 16 / 512)  # SimMIM scales by 512
    assert cfg["warmup_lr"] == pytest.approx(5e-7 * 16 / 512)
    lrs = [s["lr"] for s in read_log(out, "step")]
    assert len(lrs) == 8  # 4 steps per epoch, warm-up 1 epoch, the x0.1 step at 0.875 x 2 = epoch 1.75 = step 7
    expected = [cfg["warmup_lr"] + (cfg["lr"] - cfg["warmup_lr"]) * i / 4 for i in range(4)]
    expected += [cfg["lr"]] * 3 + [0.1 * cfg["lr"]]
    assert lrs == pytest.approx(expected, rel=1e-6)
    state = torch.load(out / "encoder.pth", weights_only=True)
    assert "mask_token" not in state and "rel_pos_bias.relative_position_bias_table" in state
    assert "pos_embed" not in state
    # --eval-only re-runs evaluation from the checkpoint and gets the same numbers
    run_script("simmim.py", *tiny, "--mask-patch-size", "8", "--out", out, "--eval-only", "--resume",
               out / "checkpoint.pth", env=ONE_THREAD)
    assert json.loads((out / "results.json").read_text())["eval"] == results["eval"]
