"""MAE: parameter counts, masking, patchify, loss, learning, timm compatibility, and the CLI end to end."""
import json

import pytest
import torch

from conftest import read_log, run_script
from mae import MAE, random_masking
from common.vit import count_params


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


def test_cli_end_to_end(tmp_path, tiny):
    out = tmp_path / "run"
    proc = run_script("mae.py", *tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
                      "--out", out, "--eval-every", "1")
    for name in ("config.json", "log.jsonl", "checkpoint.pth", "encoder.pth", "recon_e0.png", "recon_e1.png",
                 "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 8  # 64 images / batch 16 x 2 epochs
    for which in ("pretrained", "random_init"):
        assert set(results["eval"][which]) == {"knn_cls", "knn_mean", "linear_cls", "linear_mean"}
        assert all(0 <= v <= 100 for v in results["eval"][which].values())
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == list(range(8))
    assert steps[0]["lr"] == 0.0 and steps[-1]["lr"] > 0  # warm-up from exactly zero
    assert json.loads((out / "config.json").read_text())["model"] == "vit_nano"
    evals = read_log(out, "eval")  # --eval-every 1: after epoch 0 (the last epoch's is results.json)
    assert [e["epoch"] for e in evals] == [0] and set(evals[0]) >= {"pretrained", "random_init"}
    assert "loss" in proc.stderr + proc.stdout
    # --eval-only re-runs evaluation from the checkpoint and gets the same numbers
    run_script("mae.py", *tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
               "--out", out, "--eval-only", "--resume", out / "checkpoint.pth")
    assert json.loads((out / "results.json").read_text())["eval"] == results["eval"]


def test_cli_compile(tmp_path, tiny):
    out = tmp_path / "run"
    proc = run_script("mae.py", *tiny, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
                      "--out", out, "--compile", "--epochs", "1", "--subset", "32", timeout=600)
    assert "torch.compile" in proc.stdout + proc.stderr
    losses = [s["loss"] for s in read_log(out, "step")]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)
