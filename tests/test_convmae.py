"""ConvMAE: parameter counts, masking and its upsampling, no leakage through the masked convolutions, patchify,
loss, learning, the evaluation interface, official names, and the CLI end to end."""
import json

import pytest
import torch

from common import UserError
from common.evaluation import Classifier, layer_decay_groups
from common.training import parse_config
from common.vit import count_params
from conftest import read_log, run_script
from convmae import PRESETS, Config, ConvMAE, ConvViT, official_names, random_masking, upsample_mask


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
    assert len(full) == len(m.state_dict())


def test_bad_sizes_are_one_clear_error():
    for argv, words in ((["--img-size", "200"], "not divisible by 16"), (["--patch-size", "6"], "multiple of 4"),
                        (["--model", "vit_large"], "no vit_large"), (["--mask-ratio", "0.99", "--img-size", "32"],
                                                                     "no visible patch")):
        with pytest.raises(UserError, match=words):
            parse_config(Config, PRESETS, argv=["--data", "imagenet", *argv])
    cfg, _ = parse_config(Config, PRESETS, argv=[])  # the demo preset
    assert (cfg.img_size, cfg.patch_size, cfg.model) == (32, 8, "vit_micro")


def test_cli_end_to_end(tmp_path, tiny):
    out = tmp_path / "run"
    args = [*tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--out", out]
    run_script("convmae.py", *args, "--eval-every", "1", "--finetune-epochs", "1", env=ONE_THREAD)
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
