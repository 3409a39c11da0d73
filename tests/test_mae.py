"""MAE: parameter counts, masking, patchify, loss, learning, timm compatibility, and the CLI end to end."""
import contextlib
import json
import math
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

import mae
from conftest import read_log, run_script
from mae import MAE, random_masking
from common.data import mix_seed, seeded_rng
from common.evaluation import monitors
from common.training import Dist, param_groups, parse_config, resolve_amp
from common.vit import count_params, sincos_pos_embed_2d


def tiny_mae(**kw):
    torch.manual_seed(0)
    args = dict(img_size=16, patch_size=4, model="vit_nano", decoder_dim=32, decoder_depth=1, decoder_heads=2)
    return MAE(**{**args, **kw})


@pytest.mark.parametrize("model,patch,expected", [("vit_base", 16, 111_655_680), ("vit_large", 16, 329_239_296),
                                                  ("vit_huge", 14, 656_613_964)])
def test_paper_parameter_counts(model, patch, expected):
    """Trainable parameters of the official mae_vit_*_dec512d8b models (the sin-cos tables are frozen)."""
    with torch.device("meta"):
        m = MAE(img_size=224, patch_size=patch, model=model)
    assert count_params(m) == expected


def test_random_masking_invariants():
    torch.manual_seed(0)
    x = torch.randn(5, 16, 8)
    x_vis, mask, ids_restore = random_masking(x, 0.75)
    assert x_vis.shape == (5, 4, 8)
    assert torch.all(mask.sum(1) == 12)  # exactly int(16 * 0.25) = 4 visible per image
    for b in range(5):
        kept = x[b][mask[b] == 0]  # the visible tokens, in patch order
        assert torch.equal(torch.sort(x_vis[b], dim=0).values, torch.sort(kept, dim=0).values)
    assert torch.equal(torch.sort(ids_restore, 1).values, torch.arange(16).expand(5, -1))  # a permutation
    torch.manual_seed(3)
    _, m1, _ = random_masking(x, 0.75)
    torch.manual_seed(3)
    _, m2, _ = random_masking(x, 0.75)
    assert torch.equal(m1, m2)  # deterministic under a seed


def test_noise_reproduces_hand_computed_mask():
    x = torch.arange(6, dtype=torch.float).view(1, 6, 1)
    noise = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.2]])
    x_vis, mask, ids_restore = random_masking(x, 0.5, noise)
    # the three smallest noises (0.1, 0.2, 0.3 at patches 1, 5, 3) stay visible, in that order
    assert mask.tolist() == [[1, 0, 1, 0, 1, 0]]
    assert x_vis.flatten().tolist() == [1, 5, 3]
    assert ids_restore.tolist() == [[3, 0, 5, 2, 4, 1]]


@pytest.mark.parametrize("size,patch", [((24, 40), 4), ((48, 32), 8), (36, 6)])
def test_patchify_round_trip_and_order(size, patch):
    m = MAE(img_size=size, patch_size=patch, model="vit_nano", decoder_dim=32, decoder_depth=1, decoder_heads=2)
    H, W = (size, size) if isinstance(size, int) else size
    imgs = torch.randn(2, 3, H, W)
    x = m.patchify(imgs)
    assert x.shape == (2, (H // patch) * (W // patch), patch * patch * 3)
    assert torch.equal(m.unpatchify(x), imgs)
    # patch (i, j), value (r, c, channel) is pixel (i p + r, j p + c) of that channel; channel fastest
    i, j, r, c, ch = 1, 2, patch - 1, 1, 2
    n = i * (W // patch) + j
    assert x[1, n, (r * patch + c) * 3 + ch] == imgs[1, ch, i * patch + r, j * patch + c]


def test_loss_ignores_visible_patches():
    m = tiny_mae()
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        loss, pred, mask = m(imgs, 0.75, noise)
    visible = (mask == 0).unsqueeze(-1)
    assert m.forward_loss(imgs, pred + 10.0 * visible, mask).item() == pytest.approx(loss.item(), abs=1e-6)
    assert m.forward_loss(imgs, pred + 0.5 * (~visible), mask).item() > loss.item() + 0.1
    # the loss is the mean over masked patches of the per-patch MSE against per-patch-normalised pixels
    t = m.patchify(imgs)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - t) ** 2).mean(-1)
    assert loss.item() == pytest.approx((per_patch[mask == 1]).mean().item(), rel=1e-5)


def test_encoder_input_is_cls_plus_visible_tokens_by_hand():
    """forward_encoder = norm(blocks([cls + pos_0, (patch + pos)[kept, in ascending-noise order]])), rebuilt here from
    the patch conv, the sin-cos table and the blocks; with nothing hidden and the identity order it is the encoder's
    (timm-checked) forward_features."""
    m = tiny_mae().eval()
    enc = m.encoder
    with torch.no_grad():
        enc.cls_token.normal_()  # a visible cls token (its init is N(0, 0.02))
        imgs, noise = torch.randn(2, 3, 16, 16), torch.rand(2, 16)
        latent, mask, _ = m.forward_encoder(imgs, 0.75, noise)
        patches = enc.patch_embed.proj(imgs).flatten(2).transpose(1, 2) + sincos_pos_embed_2d(64, 4, 4)  # [2, 16, 64]
        keep = noise.argsort(1)[:, :4]  # the 4 smallest noises, in that order
        x = torch.cat([enc.cls_token.expand(2, -1, -1), torch.stack([patches[b, keep[b]] for b in range(2)])], 1)
        for block in enc.blocks:
            x = block(x)
        assert latent.shape == (2, 5, 64)
        assert torch.allclose(latent, enc.norm(x), atol=1e-5)
        assert mask.tolist() == [[0.0 if n in keep[b] else 1.0 for n in range(16)] for b in range(2)]
        everything, _, _ = m.forward_encoder(imgs, 0.0, torch.arange(16.0).expand(2, -1))
        assert torch.allclose(everything, enc.forward_features(imgs), atol=1e-5)


def test_decoder_input_and_output_by_hand():
    """The decoder's first block gets [cls, tokens in patch order] + the fixed sin-cos table (zero cls row), where a
    visible patch carries its own embedded latent token and every hidden one the mask token; the prediction is
    decoder_pred(decoder_norm(.)) of every token but the cls. A 4 x 6 grid catches a swapped h and w."""
    m = tiny_mae(img_size=(16, 24)).eval()
    with torch.no_grad():
        m.mask_token.normal_()
        table = m.decoder_pos_embed[0]  # [1 + 24, 32]: column in [0, 8) and [8, 16), row in [16, 24) and [24, 32)
        assert torch.all(table[0] == 0)
        i, j = 3, 5  # patch 3 * 6 + 5; channel 0 holds sin(col * 1), channel 16 sin(row * 1)
        assert table[1 + i * 6 + j, 0].item() == pytest.approx(math.sin(j), abs=1e-6)
        assert table[1 + i * 6 + j, 16].item() == pytest.approx(math.sin(i), abs=1e-6)
        assert table[1 + i * 6 + j, 8].item() == pytest.approx(math.cos(j), abs=1e-6)
        imgs, noise = torch.randn(2, 3, 16, 24), torch.rand(2, 24)
        latent, mask, ids_restore = m.forward_encoder(imgs, 0.75, noise)  # 6 visible of 24
        seen = {}
        m.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
        m.decoder_blocks[-1].register_forward_hook(lambda mod, args, out: seen.setdefault("y", out))
        pred = m.forward_decoder(latent, ids_restore)
        emb = m.decoder_embed(latent)  # [2, 1 + 6, 32]
        keep = noise.argsort(1)[:, :6]
        expected = torch.empty(2, 25, 32)
        for b in range(2):
            expected[b, 0] = emb[b, 0]
            for n in range(24):
                hits = (keep[b] == n).nonzero()
                expected[b, 1 + n] = emb[b, 1 + hits[0, 0]] if len(hits) else m.mask_token[0, 0]
        assert torch.allclose(seen["x"], expected + table, atol=1e-6)
        assert pred.shape == (2, 24, 48)
        assert torch.allclose(pred, m.decoder_pred(m.decoder_norm(seen["y"]))[:, 1:], atol=1e-6)


def test_loss_of_a_hand_made_case():
    """Two patches of 2 x 2 x 3 values, the second hidden: norm-pix target by hand (unbiased variance, + 1e-6 inside
    the root), MSE over the 12 values of the hidden patch only; without norm-pix the raw pixels."""
    m = MAE(img_size=(2, 4), patch_size=2, model="vit_nano", decoder_dim=32, decoder_depth=1, decoder_heads=2)
    imgs = torch.arange(24.0).view(1, 3, 2, 4) ** 1.5 / 10  # [1, 3, 2, 4]: patch 1 = columns 2, 3
    target = torch.stack([imgs[0, c, r, 2 + q] for r in range(2) for q in range(2) for c in range(3)])  # patch 1
    pred = torch.zeros(1, 2, 12)
    pred[0, 1] = torch.linspace(-1, 1, 12)
    mask = torch.tensor([[0.0, 1.0]])
    mean, var = target.mean(), ((target - target.mean()) ** 2).sum() / 11
    by_hand = ((pred[0, 1] - (target - mean) / math.sqrt(var + 1e-6)) ** 2).mean()
    assert m.forward_loss(imgs, pred, mask).item() == pytest.approx(by_hand.item(), rel=1e-6)
    flat = imgs.clone()
    flat[..., 2:] = 0.3  # a constant hidden patch: variance 0, the target is 0 / sqrt(1e-6) = 0 everywhere
    assert m.forward_loss(flat, pred, mask).item() == pytest.approx((pred[0, 1] ** 2).mean().item(), rel=1e-6)
    m.norm_pix_loss = False
    assert m.forward_loss(imgs, pred, mask).item() == pytest.approx(((pred[0, 1] - target) ** 2).mean().item(),
                                                                    rel=1e-6)


def test_official_init():
    """initialize_weights: the patch conv xavier-uniform on its [D, 3 p p] view, cls and mask tokens N(0, 0.02),
    every Linear xavier-uniform (the fused qkv as one [3D, D] matrix) with zero bias."""
    torch.manual_seed(0)
    m = MAE(img_size=32, patch_size=4, model="vit_micro", decoder_dim=128, decoder_depth=2, decoder_heads=4)

    def xavier(w):  # the bound sqrt(6 / (fan_in + fan_out)) is reached within 1 %
        bound = math.sqrt(6 / (w.shape[0] + w[0].numel()))
        return 0.99 * bound < w.abs().max().item() <= bound
    enc = m.encoder
    assert xavier(enc.patch_embed.proj.weight)  # [192, 3, 4, 4] as [192, 48]: 0.158 (4-D xavier: 0.075)
    for name, lin in [("qkv", enc.blocks[0].attn.qkv), ("fc2", enc.blocks[5].mlp.fc2), ("embed", m.decoder_embed),
                      ("dec proj", m.decoder_blocks[1].attn.proj), ("pred", m.decoder_pred)]:
        assert xavier(lin.weight), name
        assert torch.all(lin.bias == 0), name
    for name, token in [("cls", enc.cls_token), ("mask", m.mask_token)]:
        assert 0.015 < token.std().item() < 0.025 and token.abs().max() < 0.1, name
    assert enc.patch_embed.proj.bias.abs().sum() > 0  # PyTorch's default: the official code does not reset it


def test_training_loss_masks_from_the_generator():
    """training_loss (what main() and bench.py call): the noise of this step from `generator`, [B, N] uniform, then
    the model at cfg.mask_ratio; the same generator state gives the same loss."""
    m = tiny_mae()
    cfg = mae.Config(img_size=16, patch_size=4, mask_ratio=0.75)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        loss = mae.training_loss(m, imgs, cfg, torch.Generator().manual_seed(7))
        noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(7))
        assert loss.item() == pytest.approx(m(imgs, 0.75, noise)[0].item(), rel=1e-6)
        assert loss.item() != pytest.approx(m(imgs, 0.25, noise)[0].item(), rel=1e-4)
        assert loss.item() != pytest.approx(mae.training_loss(m, imgs, cfg, torch.Generator().manual_seed(8)).item(),
                                            rel=1e-4)


def test_reconstruction_grid_rows(tmp_path, monkeypatch):
    """save_reconstruction: the masks of seed 0; the prediction un-normalised with the true patch's mean and std
    (unbiased, + 1e-6) and pasted into the hidden patches only."""
    rows = {}
    monkeypatch.setattr(mae, "save_image_grid", lambda r, path, caption, labels: rows.update(zip(labels, r)))
    m = tiny_mae().eval()
    imgs = torch.randn(2, 3, 16, 16)
    mae.save_reconstruction(m, imgs, 0.75, tmp_path / "r.png", "t", contextlib.nullcontext())
    with torch.no_grad():
        _, pred, mask = m(imgs, 0.75, torch.rand(2, 16, generator=torch.Generator().manual_seed(0)))
    t = m.patchify(imgs)
    recon = m.unpatchify(pred * (t.var(-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(-1, keepdim=True))
    hidden = m.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 48))
    assert torch.allclose(rows["reconstruction"], mae.denormalize(recon), atol=1e-5)
    assert torch.allclose(rows["pasted"], mae.denormalize(torch.where(hidden == 1, recon, imgs)), atol=1e-5)
    assert torch.allclose(rows["original"], mae.denormalize(imgs))
    assert torch.allclose(rows["masked"], mae.denormalize(imgs) * (1 - hidden) + 0.5 * hidden)  # hidden: grey
    flat = torch.full((2, 3, 16, 16), 0.3)  # constant patches: variance 0, the + 1e-6 alone keeps the std finite
    mae.save_reconstruction(m, flat, 0.75, tmp_path / "r.png", "t", contextlib.nullcontext())
    with torch.no_grad():
        _, pred, _ = m(flat, 0.75, torch.rand(2, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(rows["reconstruction"], mae.denormalize(m.unpatchify(pred * 1e-3 + 0.3)), atol=1e-6)


def test_official_defaults_and_presets():
    """The ImageNet recipe (PRETRAIN.md) as the defaults; the CIFAR preset of IcarusWizard/MAE (pixel targets)."""
    cfg, _ = parse_config(mae.Config, mae.PRESETS, ["--data", "imagenet"])
    assert (cfg.mask_ratio, cfg.norm_pix_loss, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == \
        (0.75, True, 512, 8, 16)
    assert (cfg.blr, cfg.warmup_epochs, cfg.epochs, cfg.weight_decay, cfg.clip_grad) == (1.5e-4, 40, 800, 0.05, None)
    cfg, _ = parse_config(mae.Config, mae.PRESETS, ["--data", "cifar10"])
    assert (cfg.patch_size, cfg.model, cfg.norm_pix_loss, cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == \
        (2, "vit_tiny", False, 192, 4, 3)
    assert (cfg.batch_size * cfg.accum_iter, cfg.blr, cfg.epochs, cfg.warmup_epochs) == (4096, 1.5e-4, 2000, 200)


def run_main_in_process(module, argv, monkeypatch, **spies):
    """module.main() in this process (report stubbed: no monitors), with `spies` {name: wrapper(real)} around module
    attributes; restores the signal handlers that Run installs."""
    for name, wrap in spies.items():
        monkeypatch.setattr(module, name, wrap(getattr(module, name)))
    monkeypatch.setattr(module, "report", lambda *a, **k: {})
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py", *map(str, argv)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        module.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def assert_main_follows_the_recipe(module, tmp_path, monkeypatch, argv, hand_loss, data_kwargs, expected_lrs, betas,
                                   no_decay=()):
    """main() with 2 micro-steps per update (2 epochs of 2 steps of batch 8, a one-epoch warm-up, --clip-grad huge
    so that the gradient norm is read): the crop of the method, the model at the seed's init, the masks of global
    step `it` (not the step within the epoch) from the generator of (seed, rank 0, it), the lr of every step
    (`expected_lrs(peak)`, peak = blr x 16 / lr_batch_div: both micro-steps of an update at the first one's), the gradient norm of the first update = that of the mean
    of its two micro-steps' losses computed here by `hand_loss(model, imgs, seed)`, and the optimizer's betas and
    weight-decay groups as saved in the checkpoint."""
    calls, norms, data_args = [], [], {}

    def spy_loss(real):
        def f(model, imgs, cfg, generator):
            calls.append(dict(seed=generator.initial_seed(), imgs=imgs.clone(),
                              state={k: v.clone() for k, v in model.state_dict().items()}))
            return real(model, imgs, cfg, generator)
        return f

    def spy_data(real):
        def f(cfg, dist, **kw):
            data_args.update(kw)
            return real(cfg, dist, **kw)
        return f
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: norms.append(
        real_clip(params, max_norm).item()) or torch.tensor(norms[-1]))
    out = tmp_path / "run"
    run_main_in_process(module, [*argv, "--subset", 16, "--batch-size", 8, "--accum-iter", 2, "--epochs", 2,
                                 "--warmup-epochs", 1, "--clip-grad", 1e9, "--amp", "fp32", "--workers", 0,
                                 "--log-every", 1, "--out", out], monkeypatch,
                        training_loss=spy_loss, build_train_data=spy_data)
    cfg = json.loads((out / "config.json").read_text())
    assert {k: data_args[k] for k in data_kwargs} == data_kwargs
    assert [c["seed"] for c in calls] == [mix_seed(0, 0, it) for it in range(4)]
    peak = cfg["blr"] * 16 / module.Config.lr_batch_div
    assert cfg["lr"] == pytest.approx(peak)
    assert [s["lr"] for s in read_log(out, "step")] == pytest.approx(expected_lrs(peak), rel=1e-9)
    with seeded_rng(0):
        model = module.build_model(module.Config(**{k: v for k, v in cfg.items() if k not in ("lr", "method")}))
    assert all(torch.equal(v, calls[0]["state"][k]) for k, v in model.state_dict().items())  # the seed's init
    model.train()
    loss = (hand_loss(model, calls[0]["imgs"], calls[0]["seed"]) + hand_loss(model, calls[1]["imgs"], calls[1]["seed"]))
    (loss / 2).backward()
    norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
    assert len(norms) == 2 and norms[0] == pytest.approx(norm, rel=1e-4)
    saved = torch.load(out / "checkpoint.pth", weights_only=False)["optimizer"]["param_groups"]
    groups = param_groups(model, 0.05, no_decay=no_decay)
    assert [(tuple(g["betas"]), g["weight_decay"], len(g["params"])) for g in saved] == \
        [(betas, 0.05, len(groups[0]["params"])), (betas, 0.0, len(groups[1]["params"]))]
    return calls, out


def test_main_follows_the_recipe(tmp_path, monkeypatch, one_thread):
    """mae.main(): RandomResizedCrop(0.2, 1) bicubic; masks of 75 % from the step's generator; lr warm-up from 0
    over one epoch (2 steps), then the half cosine, each update at the lr of its first micro-step (official
    `data_iter_step % accum_iter == 0`); the two micro-steps of an update averaged; AdamW(0.9, 0.95), wd 0.05
    except biases and norms."""
    def hand_loss(model, imgs, seed):
        return model(imgs, 0.75, torch.rand(8, 16, generator=torch.Generator().manual_seed(seed)))[0]
    assert_main_follows_the_recipe(
        mae, tmp_path, monkeypatch, ["--model", "vit_nano", "--img-size", 16, "--patch-size", 4, "--decoder-dim", 32,
                                     "--decoder-depth", 1, "--decoder-heads", 2], hand_loss,
        dict(crop_scale=(0.2, 1.0), interpolation="bicubic"), lambda peak: [0, 0, peak, peak],
        (0.9, 0.95))


def assert_exported_encoder_is_the_trained_one(out):
    """encoder.pth = the encoder.* weights of the run's final checkpoint: the trained encoder, nothing else."""
    exported = torch.load(out / "encoder.pth", weights_only=True)
    model = torch.load(out / "checkpoint.pth", weights_only=False)["model"]
    trained = {k.removeprefix("encoder."): v for k, v in model.items() if k.startswith("encoder.")}
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)


def recompute_monitors(module, out):
    """The monitors of a finished CLI run, computed again here from its encoder.pth and config.json through
    common.evaluation.monitors (the baseline: the encoder the seed initialises)."""
    cfg_dict = json.loads((out / "config.json").read_text())
    cfg = module.Config(**{k: v for k, v in cfg_dict.items() if k != "method"})
    device = torch.device("cpu")
    amp = resolve_amp(cfg.amp, device)
    run = SimpleNamespace(cfg=cfg, dist=Dist(0, 1, 0, device), device=device, is_main=True, log=lambda *a: None,
                          autocast=lambda: torch.autocast("cpu", dtype=amp, enabled=amp is not None))
    encoder = module.build_model(cfg).encoder
    encoder.load_state_dict(torch.load(out / "encoder.pth", weights_only=True))
    return monitors(encoder, module.build_model, run)


def test_tiny_model_overfits_one_batch():
    m = tiny_mae()
    imgs = torch.randn(4, 3, 16, 16)
    noise = torch.rand(4, 16)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss, _, _ = m(imgs, 0.75, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_encoder_loads_into_timm_with_same_features():
    timm = pytest.importorskip("timm")  # installed by requirements.txt: this runs in CI
    m = tiny_mae(img_size=32)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                                           num_heads=2, num_classes=0)
    ref.load_state_dict(m.encoder.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    m.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(m.encoder.forward_features(imgs), ref.forward_features(imgs), atol=1e-5)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the CLI runs on one thread as this process does (same sums, same numbers)


def test_cli_end_to_end(tmp_path, tiny, one_thread):
    out = tmp_path / "run"
    # --blr 0.02 (lr 1.25e-3): 8 steps move the encoder far enough from its init that the monitors tell them apart
    proc = run_script("mae.py", *tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
                      "--blr", "0.02", "--out", out, "--eval-every", "1", env=ONE_THREAD)
    for name in ("config.json", "log.jsonl", "checkpoint.pth", "encoder.pth", "recon_e0.png", "recon_e1.png",
                 "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 8  # 64 images / batch 16 x 2 epochs
    for which in ("pretrained", "random_init"):
        assert set(results["eval"][which]) == {"knn_cls", "knn_mean", "linear_cls", "linear_mean"}
        assert all(0 <= v <= 100 for v in results["eval"][which].values())
    # the numbers are those of the exported encoder and of the seed's initial encoder, computed again here
    assert results["eval"] == recompute_monitors(mae, out)
    assert results["eval"]["pretrained"] != results["eval"]["random_init"]  # (so the line above tells them apart)
    assert_exported_encoder_is_the_trained_one(out)
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == list(range(8))
    assert steps[0]["lr"] == 0.0 and steps[-1]["lr"] > 0  # warm-up from exactly zero
    assert json.loads((out / "config.json").read_text())["model"] == "vit_nano"
    evals = read_log(out, "eval")  # --eval-every 1: after epoch 0 (the last epoch's is results.json)
    assert [e["epoch"] for e in evals] == [0] and set(evals[0]) >= {"pretrained", "random_init"}
    assert "loss" in proc.stderr + proc.stdout
    # --eval-only re-runs evaluation from the checkpoint and gets the same numbers
    run_script("mae.py", *tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
               "--blr", "0.02", "--out", out, "--eval-only", "--resume", out / "checkpoint.pth", env=ONE_THREAD)
    assert json.loads((out / "results.json").read_text())["eval"] == results["eval"]


def test_compile_is_one_graph_and_trains_as_eager(tmp_path, tiny, monkeypatch, one_thread):
    """--compile: main() hands the model to torch.compile, whose trace of the training step (forward and backward)
    is one graph, with no graph break and no recompilation over the run's 4 steps, and trains to the same losses and
    weights as the same command without --compile. The backend is aot_eager: the same Dynamo + AOTAutograd trace that
    inductor compiles, without inductor's C++ build (minutes on a cold cache); fp32, so that the two runs compare
    closely."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    import common.training as training
    real_compile, compiled = torch.compile, []

    def compile_aot_eager(model, **kw):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="aot_eager", **kw)

    monkeypatch.setattr(training.torch, "compile", compile_aot_eager)
    args = [*tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--epochs", "2",
            "--subset", "32", "--amp", "fp32"]
    torch._dynamo.reset()
    counters.clear()
    try:
        run_main_in_process(mae, [*args, "--out", tmp_path / "run", "--compile"], monkeypatch)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    assert compiled == ["MAE"] and (graphs, breaks) == (1, 0)  # a recompilation would add a graph
    run_main_in_process(mae, [*args, "--out", tmp_path / "eager"], monkeypatch)
    losses, eager = ([s["loss"] for s in read_log(tmp_path / d, "step")] for d in ("run", "eager"))
    assert len(losses) == 4 and losses == pytest.approx(eager, rel=1e-5) and losses[-1] != losses[0]
    # three updates (step 0 has lr 0) move a weight by a few times the lr (~1e-4): the two agree far closer
    trained, reference = (torch.load(tmp_path / d / "checkpoint.pth", weights_only=True)["model"]
                          for d in ("run", "eager"))
    assert trained.keys() == reference.keys()
    assert all(torch.allclose(trained[k], reference[k], rtol=0, atol=1e-5) for k in reference)
