"""ConvMAE: parameter counts, masking and its upsampling, no leakage through the masked convolutions, patchify,
loss, learning, the evaluation interface, official names, and the CLI end to end."""
import contextlib
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import convmae
import mae
from common import UserError
from common.data import build_train_data, mix_seed, seeded_rng
import finetune
from finetune import Classifier, layer_decay_groups
from common.training import Dist, parse_config, resolve_amp
from common.vit import count_params
from conftest import read_log, run_script
from convmae import PRESETS, Config, ConvBlock, ConvMAE, ConvViT, official_names, random_masking, upsample_mask
from test_mae import assert_exported_encoder_is_the_trained_one, assert_main_follows_the_recipe


# Tiny models run as fast on one thread, and 10x faster than on two when the cores are shared (conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the same for the CLI subprocesses


def tiny_convmae(img_size=16, patch_size=4, **kw):
    torch.manual_seed(0)
    args = dict(model="vit_nano", decoder_dim=32, decoder_depth=1, decoder_heads=2)
    return ConvMAE(img_size, patch_size, **{**args, **kw})


def test_official_parameter_counts():
    """convmae_convvit_base_patch16: 114,790,528 trainable (the two sin-cos tables, 250,880, are frozen), with the
    per-module counts of the official model (reference B8)."""
    with torch.device("meta"):
        m = ConvMAE(img_size=224, patch_size=16, model="vit_base")
    assert count_params(m) == 114_790_528
    assert count_params(m, trainable=False) == 115_041_408
    stem = m.encoder.patch_embed
    counts = {name: count_params(getattr(stem, name), trainable=False)
              for name in ("patch_embed1", "patch_embed2", "patch_embed3", "patch_embed4", "blocks1", "blocks2")}
    assert counts == {"patch_embed1": 13_056, "patch_embed2": 394_368, "patch_embed3": 1_181_952,
                      "patch_embed4": 590_592, "blocks1": 1_329_664, "blocks2": 2_977_536}
    assert count_params(m.encoder.blocks) == 77_966_592
    assert count_params(m.stage1_output_decode) == 3_146_496 and count_params(m.stage2_output_decode) == 1_180_416
    assert count_params(m.decoder_blocks) == 25_219_072
    assert m.encoder.pos_embed.shape == (1, 196, 768) and m.decoder_pred.out_features == 16 * 16 * 3


def test_layer_norm_eps_and_init():
    """LN eps 1e-5 in the conv parts (official nn.LayerNorm default), 1e-6 elsewhere; xavier Linear with zero bias;
    the stage-1/2 convs keep PyTorch's default init (bias non-zero), the stage-3 embedding conv is xavier."""
    m = tiny_convmae(img_size=32)
    stem = m.encoder.patch_embed
    assert stem.patch_embed1.norm.eps == 1e-5 and stem.blocks1[0].norm1.eps == 1e-5
    assert stem.blocks2[0].norm2.eps == 1e-5
    assert m.encoder.blocks[0].norm1.eps == 1e-6 and m.encoder.norm.eps == 1e-6 and m.decoder_norm.eps == 1e-6
    assert torch.all(stem.patch_embed4.bias == 0) and torch.all(m.decoder_pred.bias == 0)
    assert stem.blocks1[0].conv1.bias.abs().sum() > 0 and m.stage1_output_decode.bias.abs().sum() > 0
    w = stem.patch_embed3.proj.weight  # xavier bound sqrt(6 / (fan_in + fan_out)) on the [D, C2 * 4] view
    bound = (6 / (w.shape[0] + w[0].numel())) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert not m.encoder.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    assert 0.01 < m.mask_token.std().item() < 0.03 and m.mask_token.abs().max() < 0.1  # N(0, 0.02), 32 values


def test_random_masking_invariants_and_noise():
    torch.manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(5, 16, 0.75)
    assert ids_keep.shape == (5, 4) and torch.all(mask.sum(1) == 12)
    for b in range(5):
        assert sorted(ids_keep[b].tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(5, -1))
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2]])
    ids_keep, mask, ids_restore = random_masking(1, 6, 0.5, noise)
    assert ids_keep.tolist() == [[1, 5, 3]] and mask.tolist() == [[1, 0, 1, 0, 1, 0]]
    assert ids_restore.tolist() == [[3, 0, 5, 2, 4, 1]]


def test_mask_upsampling_matches_official_formula():
    """The official chain for 14 x 14 -> 56 x 56: reshape, repeat 16x, reshape to 4 x 4 blocks, permute."""
    mask = (torch.rand(3, 196) < 0.75).float()
    official = mask.reshape(-1, 14, 14).unsqueeze(-1).repeat(1, 1, 1, 16).reshape(-1, 14, 14, 4, 4) \
        .permute(0, 1, 3, 2, 4).reshape(3, 56, 56).unsqueeze(1)
    assert torch.equal(upsample_mask(mask.view(3, 14, 14), 4), official)
    up = upsample_mask(mask.view(3, 7, 28), 2)  # non-square: patch (i, j) covers rows 2i..2i+1, columns 2j..2j+1
    assert up.shape == (3, 1, 14, 56) and up[1, 0, 2 * 5 + 1, 2 * 17] == mask.view(3, 7, 28)[1, 5, 17]


def test_conv_stem_by_hand():
    """ConvStem with a mask, rebuilt from its parts: stage embeddings GELU(LN(conv k = s)), stage-1 blocks with the
    mask's visible pixels as 4 x 4 blocks, stage-2 blocks with 2 x 2 blocks, the stage-3 map's tokens (row-major)
    through the linear patch_embed4; ConvViT.embed adds the sin-cos table to them."""
    torch.manual_seed(0)
    enc = ConvViT((32, 48), 8, "vit_nano")  # stride 2 x 2 x 2; stage 1 at 16 x 24, stage 3 at 4 x 6
    stem = enc.patch_embed
    imgs, mask = torch.randn(2, 3, 32, 48), (torch.rand(2, 4, 6) < 0.75).float()

    def stage_embed(se, x, stride):
        y = F.conv2d(x, se.proj.weight, se.proj.bias, stride=stride)
        return F.gelu(F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], se.norm.weight, se.norm.bias, 1e-5)
                      .permute(0, 3, 1, 2))
    with torch.no_grad():
        tokens, stage1, stage2 = stem(imgs, mask)
        x = stage_embed(stem.patch_embed1, imgs, 2)
        vis1 = torch.kron(1 - mask, torch.ones(4, 4)).unsqueeze(1)  # [2, 1, 16, 24]
        for blk in stem.blocks1:
            x = blk(x, vis1)
        assert torch.allclose(stage1, x, atol=1e-5)
        x = stage_embed(stem.patch_embed2, x, 2)
        vis2 = torch.kron(1 - mask, torch.ones(2, 2)).unsqueeze(1)  # [2, 1, 8, 12]
        for blk in stem.blocks2:
            x = blk(x, vis2)
        assert torch.allclose(stage2, x, atol=1e-5)
        x = stage_embed(stem.patch_embed3, x, 2)  # [2, 64, 4, 6]
        expected = stem.patch_embed4(x.permute(0, 2, 3, 1).reshape(2, 24, 64))
        assert torch.allclose(tokens, expected, atol=1e-5)
        assert torch.allclose(enc.embed(imgs), stem(imgs)[0] + enc.pos_embed, atol=1e-6)


@pytest.mark.parametrize("img_size,patch_size", [(16, 4), ((32, 48), 8), (32, 16)])
def test_no_leakage_from_masked_pixels(img_size, patch_size):
    """Perturbing only the pixels of masked patches leaves the encoder output of the visible tokens bitwise
    unchanged (fp32), through the dense masked-convolution stages and the fusion; perturbing one visible pixel
    changes it."""
    m = tiny_convmae(img_size, patch_size).eval()
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    imgs = torch.randn(2, 3, H, W)
    noise = torch.rand(2, m.num_patches)
    with torch.no_grad():
        latent, mask, _ = m.forward_encoder(imgs, 0.75, noise)
        mask_px = m.unpatchify(mask.unsqueeze(-1).expand(-1, -1, patch_size ** 2 * 3))  # [B, 3, H, W], 1 = masked
        assert 0 < mask_px.mean() < 1
        perturbed = imgs + 10 * torch.randn_like(imgs) * mask_px
        latent2, mask2, _ = m.forward_encoder(perturbed, 0.75, noise)
        assert torch.equal(mask, mask2) and torch.equal(latent, latent2)
        b, n = 0, int(torch.nonzero(mask[0] == 0)[0])  # a visible patch
        i, j = divmod(n, m.grid_size[1])
        visible_change = imgs.clone()
        visible_change[b, :, i * patch_size, j * patch_size] += 5.0
        latent3, _, _ = m.forward_encoder(visible_change, 0.75, noise)
        assert (latent3 - latent).abs().max() > 1e-3


@pytest.mark.parametrize("size,patch", [((32, 48), 8), (16, 4)])
def test_patchify_round_trip_and_order(size, patch):
    m = tiny_convmae(size, patch)
    H, W = (size, size) if isinstance(size, int) else size
    imgs = torch.randn(2, 3, H, W)
    x = m.patchify(imgs)
    assert x.shape == (2, (H // patch) * (W // patch), patch * patch * 3)
    assert torch.equal(m.unpatchify(x), imgs)
    i, j, r, c, ch = 1, 2, patch - 1, 1, 2
    assert x[1, i * (W // patch) + j, (r * patch + c) * 3 + ch] == imgs[1, ch, i * patch + r, j * patch + c]


def test_loss_ignores_visible_patches_and_shapes():
    m = tiny_convmae()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, ids_restore = m.forward_encoder(imgs, 0.75, noise)
        assert latent.shape == (2, 4, 64)  # the ViT stage saw the 4 visible tokens only
        loss, pred, mask = m(imgs, 0.75, noise)
    visible = (mask == 0).unsqueeze(-1)
    assert m.forward_loss(imgs, pred + 10.0 * visible, mask).item() == pytest.approx(loss.item(), abs=1e-6)
    assert m.forward_loss(imgs, pred + 0.5 * (~visible), mask).item() > loss.item() + 0.1
    t = m.patchify(imgs)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert loss.item() == pytest.approx(((pred - t) ** 2).mean(-1)[mask == 1].mean().item(), rel=1e-5)


def test_fusion_is_added_before_the_final_norm():
    """latent = norm(blocks(visible tokens) + s1 + s2), s1/s2 the strided-conv stage-1/2 maps at the same tokens."""
    m = tiny_convmae(img_size=32, patch_size=8)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, _ = m.forward_encoder(imgs, 0.75, noise)
        ids_keep = random_masking(2, 16, 0.75, noise)[0]
        x, f1, f2 = m.encoder.patch_embed(imgs, mask.view(2, 4, 4))
        x = x + m.encoder.pos_embed
        s = (m.stage1_output_decode(f1).flatten(2).transpose(1, 2)
             + m.stage2_output_decode(f2).flatten(2).transpose(1, 2))
        pick = lambda t: torch.stack([t[b, ids_keep[b]] for b in range(2)])  # noqa: E731
        y = pick(x)
        for block in m.encoder.blocks:
            y = block(y)
        assert torch.allclose(latent, m.encoder.norm(y + pick(s)), atol=1e-5)


def test_conv_block_by_hand():
    """ConvBlock (official CBlock): x + conv2(dwconv5x5(visible * conv1(LN(x)))), then x + fc2(GELU(fc1(LN(x)))),
    with LayerNorm over the channels at every position (eps 1e-5), recomputed here with functional ops."""
    torch.manual_seed(0)
    blk = ConvBlock(8)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.3)  # the LayerNorm gains and biases too
    x, visible = torch.randn(2, 8, 6, 5), (torch.rand(2, 1, 6, 5) > 0.5).float()

    def ln(norm, t):  # over the channel dimension, per position
        mu, var = t.mean(1, keepdim=True), t.var(1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-5) * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        y = F.conv2d(ln(blk.norm1, x), blk.conv1.weight, blk.conv1.bias) * visible
        x1 = x + F.conv2d(F.conv2d(y, blk.attn.weight, blk.attn.bias, padding=2, groups=8), blk.conv2.weight,
                          blk.conv2.bias)
        h = F.gelu(F.conv2d(ln(blk.norm2, x1), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        expected = x1 + F.conv2d(h, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        assert torch.allclose(blk(x, visible), expected, atol=1e-5)
        assert blk.attn.kernel_size == (5, 5) and blk.attn.groups == 8


def test_decoder_input_and_output_by_hand():
    """The decoder's first block gets the tokens in patch order (no cls) + the fixed sin-cos table, a visible patch
    carrying its own embedded latent token and every hidden one the mask token; the prediction is
    decoder_pred(decoder_norm(.)). A 4 x 6 grid catches a swapped h and w in both sin-cos tables."""
    m = tiny_convmae((32, 48), 8).eval()
    with torch.no_grad():
        m.mask_token.normal_()
        for table in (m.decoder_pos_embed[0], m.encoder.pos_embed[0]):  # [24, 32] and [24, 64]
            q = table.shape[1] // 4
            i, j = 3, 5  # token 3 * 6 + 5: channel 0 holds sin(col), channel q cos(col), channel 2q sin(row)
            assert table[i * 6 + j, 0].item() == pytest.approx(math.sin(j), abs=1e-6)
            assert table[i * 6 + j, q].item() == pytest.approx(math.cos(j), abs=1e-6)
            assert table[i * 6 + j, 2 * q].item() == pytest.approx(math.sin(i), abs=1e-6)
        imgs, noise = torch.randn(2, 3, 32, 48), torch.rand(2, 24)
        latent, mask, ids_restore = m.forward_encoder(imgs, 0.75, noise)  # 6 visible of 24
        seen = {}
        m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
        m.decoder_blocks[-1].register_forward_hook(lambda mod, args, out: seen.setdefault("y", out))
        pred = m.forward_decoder(latent, ids_restore)
        emb = m.decoder_embed(latent)  # [2, 6, 32]
        keep = noise.argsort(1)[:, :6]
        expected = torch.empty(2, 24, 32)
        for b in range(2):
            for n in range(24):
                hits = (keep[b] == n).nonzero()
                expected[b, n] = emb[b, hits[0, 0]] if len(hits) else m.mask_token[0, 0]
        assert torch.allclose(seen["x"], expected + m.decoder_pos_embed, atol=1e-6)
        assert pred.shape == (2, 24, 8 * 8 * 3)
        assert torch.allclose(pred, m.decoder_pred(m.decoder_norm(seen["y"])), atol=1e-6)


def test_training_loss_masks_from_the_generator():
    """training_loss (what main() and bench.py call): the noise of this step from `generator`, then the model at
    cfg.mask_ratio."""
    m = tiny_convmae()
    cfg = Config(img_size=16, patch_size=4, mask_ratio=0.75)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        loss = convmae.training_loss(m, imgs, cfg, torch.Generator().manual_seed(7))
        noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(7))
        assert loss.item() == pytest.approx(m(imgs, 0.75, noise)[0].item(), rel=1e-6)
        assert loss.item() != pytest.approx(m(imgs, 0.25, noise)[0].item(), rel=1e-4)


def test_reconstruction_grid_rows(tmp_path, monkeypatch):
    """save_reconstruction: the masks of seed 0; the prediction un-normalised with the true patch's mean and std and
    pasted into the hidden patches only."""
    rows = {}
    monkeypatch.setattr(convmae, "save_image_grid", lambda r, path, caption, labels: rows.update(zip(labels, r)))
    m = tiny_convmae().eval()
    imgs = torch.randn(2, 3, 16, 16)
    convmae.save_reconstruction(m, imgs, 0.75, tmp_path / "r.png", "t", contextlib.nullcontext())
    with torch.no_grad():
        _, pred, mask = m(imgs, 0.75, torch.rand(2, 16, generator=torch.Generator().manual_seed(0)))
    t = m.patchify(imgs)
    recon = m.unpatchify(pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True))
    hidden = m.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48))
    assert torch.allclose(rows["reconstruction"], convmae.denormalize(recon), atol=1e-5)
    assert torch.allclose(rows["pasted"], convmae.denormalize(torch.where(hidden == 1, recon, imgs)), atol=1e-5)
    assert torch.allclose(rows["masked"], convmae.denormalize(imgs) * (1 - hidden) + 0.5 * hidden)  # hidden: grey


def test_official_defaults_and_recipes():
    """The official ImageNet recipe (PRETRAIN.md) as the defaults; the fine-tune recipes are MAE's (ConvMAE-B: MAE-B's;
    the small-image one at its lr per 256 images, without MAE's batch 64)."""
    cfg, _ = parse_config(Config, PRESETS, ["--data", "imagenet"])
    assert (cfg.model, cfg.patch_size, cfg.epochs, cfg.batch_size, cfg.blr, cfg.warmup_epochs, cfg.mask_ratio) == \
        ("vit_base", 16, 1600, 128, 1.5e-4, 40, 0.75)
    assert (cfg.norm_pix_loss, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads, cfg.weight_decay) == \
        (True, 512, 8, 16, 0.05)
    assert convmae.FINETUNE["imagenet"] == mae.FINETUNE["imagenet"]
    assert convmae.FINETUNE["medium"] == mae.FINETUNE["medium"]
    small = {k: v for k, v in mae.FINETUNE["small"].items() if k not in ("batch_size", "blr")}
    assert convmae.FINETUNE["small"] == {**small, "blr": 1e-3}


def test_main_follows_the_recipe(tmp_path, monkeypatch):
    """convmae.main() (MAE's engine): RandomResizedCrop(0.2, 1) bicubic; masks of 75 % from the step's generator; lr
    warm-up from 0 over one epoch (2 steps), then the half cosine; the two micro-steps of an update averaged; AdamW(0.9,
    0.95), wd 0.05 except biases and norms."""
    def hand_loss(model, imgs, seed):
        return model(imgs, 0.75, torch.rand(8, 16, generator=torch.Generator().manual_seed(seed)))[0]
    assert_main_follows_the_recipe(
        convmae, tmp_path, monkeypatch, ["--model", "vit_nano", "--img-size", 16, "--patch-size", 4,
                                         "--decoder-dim", 32, "--decoder-depth", 1, "--decoder-heads", 2], hand_loss,
        dict(crop_scale=(0.2, 1.0), interpolation="bicubic"), lambda peak: [0, 0, peak, peak],
        (0.9, 0.95))


def test_tiny_model_overfits_one_batch():
    m = tiny_convmae()
    imgs = torch.randn(4, 3, 16, 16)
    noise = torch.rand(4, 16)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        loss, _, _ = m(imgs, 0.75, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])


def test_evaluation_interface():
    """What common/evaluation.py uses: forward_features [B, 1+N, D] with the pooled token at 0, the fine-tuning
    Classifier pooling all N tokens unmasked, layer decay giving the conv stages the embedding's layer (official
    util/lr_decay.py), drop path linear over conv + ViT blocks."""
    torch.manual_seed(0)
    enc = ConvViT(32, 8, "vit_micro").eval()  # 2 + 2 conv blocks, 5 ViT blocks, 16 tokens
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        x = enc.embed(imgs)  # unmasked
        for block in enc.blocks:
            x = block(x)
        feats = enc.forward_features(imgs)
        assert feats.shape == (2, 17, 192)
        assert torch.allclose(feats[:, 1:], enc.norm(x), atol=1e-5)
        assert torch.allclose(feats[:, 0], enc.norm(x.mean(1)), atol=1e-5)
        clf = Classifier(enc, 10).eval()
        assert torch.allclose(clf(imgs), clf.head(clf.fc_norm(x.mean(1))), atol=1e-5)
    scale = {id(p): g["lr_scale"] for g in layer_decay_groups(clf, 0.05, 0.5) for p in g["params"]}
    named = dict(clf.named_parameters())
    assert scale[id(named["encoder.patch_embed.blocks2.1.attn.weight"])] == 0.5 ** 6  # layer 0 of 5 + 1
    assert scale[id(named["encoder.patch_embed.patch_embed4.weight"])] == 0.5 ** 6
    assert scale[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5 ** 5
    assert scale[id(named["head.weight"])] == 1.0
    enc.set_drop_path(0.3)
    rates = [b.drop_path.drop_prob for b in enc.conv_blocks() + list(enc.blocks)]
    assert rates == pytest.approx([0.3 * i / 8 for i in range(9)])


def test_official_names():
    m = tiny_convmae(img_size=32)
    names = set(official_names(m.encoder.state_dict()))
    assert {"patch_embed1.proj.weight", "patch_embed1.norm.bias", "blocks1.0.attn.weight", "blocks2.0.mlp.fc2.bias",
            "patch_embed3.proj.weight", "patch_embed4.weight", "pos_embed", "blocks3.0.attn.qkv.weight",
            "norm.weight"} <= names
    assert not any(n.startswith(("patch_embed.", "blocks.")) for n in names)
    full = official_names(m.state_dict())
    assert "stage1_output_decode.weight" in full and "decoder_blocks.0.mlp.fc1.weight" in full and "mask_token" in full
    assert {"patch_embed1.proj.weight", "blocks1.0.attn.weight", "blocks3.0.attn.qkv.weight", "norm.weight"} \
        <= set(full)
    assert len(full) == len(m.state_dict())


def test_bad_sizes_are_one_clear_error():
    for argv, words in ((["--img-size", "200"], "not divisible by 16"), (["--patch-size", "6"], "multiple of 4"),
                        (["--model", "vit_large"], "no vit_large"), (["--mask-ratio", "0.99", "--img-size", "32"],
                                                                     "no visible patch")):
        with pytest.raises(UserError, match=words):
            parse_config(Config, PRESETS, argv=["--data", "imagenet", *argv])
    cfg, _ = parse_config(Config, PRESETS, argv=[])  # the demo preset
    assert (cfg.img_size, cfg.patch_size, cfg.model) == (32, 8, "vit_micro")


def cli_run_standin(out):
    """The config of a finished CLI run and what common/evaluation.py needs of its Run, on this process's CPU."""
    cfg = Config(**{k: v for k, v in json.loads((out / "config.json").read_text()).items() if k != "method"})
    device = torch.device("cpu")
    amp = resolve_amp(cfg.amp, device)
    logs = []
    return cfg, SimpleNamespace(cfg=cfg, dist=Dist(0, 1, 0, device), device=device, is_main=True, amp_dtype=amp,
                                logs=logs, log=logs.append, mean_over_ranks=lambda v: v,
                                autocast=lambda: torch.autocast("cpu", dtype=amp, enabled=amp is not None))


def test_cli_end_to_end(tmp_path, tiny):
    out = tmp_path / "run"
    args = [*tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--out", out]
    # --blr 0.02 (lr 1.25e-3): 8 steps move the encoder far enough that its fine-tune differs from the init's
    run_script("convmae.py", *args, "--eval-every", "1", "--finetune-epochs", "1", "--blr", "0.02",
               env=ONE_THREAD)
    for name in ("config.json", "log.jsonl", "checkpoint.pth", "encoder.pth", "recon_e0.png", "recon_e1.png",
                 "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "convmae" and results["global_step"] == 8  # 64 images / batch 16 x 2 epochs
    for which in ("pretrained", "random_init"):
        assert set(results["eval"][which]) == {"knn_cls", "knn_mean", "linear_cls", "linear_mean"}
    assert 0 <= results["finetune"]["pretrained"] <= 100 and results["finetune"]["recipe"]["layer_decay"] == 0.75
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == list(range(8)) and steps[0]["lr"] == 0.0 and 0 < steps[-1]["loss"] < 10
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]  # the 8 steps learn (1.86 -> 1.27 here)
    # the first step's loss again here: the seed's initial model, the first batch of RandomResizedCrop(0.2, 1)
    # bicubic, the masks of the generator of (seed 0, rank 0, step 0); the run's precision (bf16 on an AMX CPU)
    cfg, run = cli_run_standin(out)
    with seeded_rng(0):
        model = convmae.build_model(cfg)
    data = build_train_data(cfg, run.dist, crop_scale=(0.2, 1.0), interpolation="bicubic", log=run.log)
    imgs, _ = next(iter(data.epoch(0)))
    noise = torch.rand(16, 16, generator=torch.Generator().manual_seed(mix_seed(0, 0, 0)))
    with run.autocast():
        first = model(imgs, 0.75, noise)[0].item()
    assert steps[0]["loss"] == pytest.approx(first, rel=1e-5)
    # the fine-tune again here: finetune.py on the exported encoder with FINETUNE["small"] for 1 epoch, as the run's
    # --finetune-epochs ran it: the same top-1 and the same training loss (the top-1 of 4 steps is near chance for
    # any encoder; the loss tells encoders apart)
    saved = json.loads((out / "finetune" / "config.json").read_text())
    assert saved["init"] == str(out / "encoder.pth") and saved["epochs"] == 1 and saved["layer_decay"] == 0.75
    again = finetune.main(["--init", str(out / "encoder.pth"), "--epochs", "1", "--warmup-epochs",
                           str(saved["warmup_epochs"]), "--batch-size", str(saved["batch_size"]), "--subset",
                           str(cfg.subset), "--img-size", "16", "--workers", "0", "--out", str(tmp_path / "again")])
    assert results["finetune"]["pretrained"] == again["top1"]
    line = next(m for m in (tmp_path / "again" / "log.jsonl").read_text().splitlines() if '"kind": "epoch"' in m)
    assert json.loads(line)["loss"] == read_log(out / "finetune", "epoch")[0]["loss"]
    assert_exported_encoder_is_the_trained_one(out)
    assert [e["epoch"] for e in read_log(out, "eval")] == [0]
    encoder = torch.load(out / "encoder.pth", weights_only=True)
    ref = ConvViT(16, 4, "vit_nano")
    ref.load_state_dict(encoder, strict=True)  # the documented names, nothing else (no fusion convs, no decoder)
    # one clear line and exit code 2 for a size the stages cannot divide; --help reads as the method
    bad = run_script("convmae.py", *args[:-1], tmp_path / "bad", "--img-size", "18", check=False, env=ONE_THREAD)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "not divisible by 4" in bad.stderr
    assert not (tmp_path / "bad").exists()
    help_text = " ".join(run_script("convmae.py", "--help", env=ONE_THREAD).stdout.split())
    assert "ConvMAE: Masked Convolution Meets Masked Autoencoders" in help_text and "--mask-ratio" in help_text
