"""BEiT v2: the VQ-KD quantizer (nearest code by cosine, the EMA rule on a hand example, k-means init,
straight-through gradient), parameter counts, exact-count masks, the patch-aggregation loss and its absence from the
exported encoder, the teacher (repository encoder.pth, timm, grid mismatch), and the CLI end to end with a teacher
written by a short mae.py run."""
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import beit
import beit2
from common import UserError
from common.data import IMAGENET_MEAN, IMAGENET_STD
from common.training import parse_config
from common.vit import count_params
from conftest import ROOT, TINY, assert_loss_ignores_visible_targets, read_log, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1"}



def quantizer(codebook, decay=0.99):
    q = beit2.NormEMAQuantizer(*codebook.shape, decay=decay)
    q.codebook.copy_(codebook)
    q.initted.fill_(True)
    return q


def tiny_vqkd(img_size=16, vocab=64, target_dim=24, teacher=""):
    torch.manual_seed(0)
    return beit2.VQKD(vocab, 4, img_size, "vit_nano", 8, 1, target_dim, teacher=teacher)


# ------------------------------------------------------------------------------------------------------ quantizer
def test_quantizer_picks_the_nearest_code_by_cosine():
    torch.manual_seed(0)
    codebook = F.normalize(torch.randn(16, 4), dim=-1)
    q = quantizer(codebook).eval()
    z = torch.randn(3, 5, 4) * torch.rand(3, 5, 1) * 10  # any lengths: only the direction counts
    z_q, loss, ids = q(z)
    cos = F.normalize(z, dim=-1) @ codebook.t()  # [3, 5, 16]
    assert ids.shape == (3, 5) and torch.equal(ids, cos.argmax(-1))
    assert torch.allclose(z_q, codebook[ids], atol=1e-6)
    assert loss.item() == pytest.approx(F.mse_loss(codebook[ids], F.normalize(z, dim=-1)).item(), rel=1e-5)
    assert torch.equal(q.codebook, codebook)  # eval: no update


def test_ema_update_on_a_hand_example():
    """Codes e0 = (1, 0), e1 = (0, 1), e2 = (-1, 0), decay 0.9. z = (3, 1), (2, 1) pick e0, (1, 3) picks e1, nobody
    picks e2. e0 <- l2norm(0.9 e0 + 0.1 l2norm(mean(l2norm((3, 1)), l2norm((2, 1))))), e1 likewise with l2norm((1, 3))
    alone; e2 keeps its value exactly."""
    q = quantizer(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), decay=0.9).train()
    z = torch.tensor([[[3.0, 1.0], [2.0, 1.0], [1.0, 3.0]]])
    _, _, ids = q(z)
    assert ids.tolist() == [[0, 0, 1]]
    a, b, c = (torch.tensor(v) / math.hypot(*v) for v in ([3.0, 1.0], [2.0, 1.0], [1.0, 3.0]))
    mean0 = (a + b) / (a + b).norm()
    e0 = 0.9 * torch.tensor([1.0, 0.0]) + 0.1 * mean0
    e1 = 0.9 * torch.tensor([0.0, 1.0]) + 0.1 * c
    assert torch.allclose(q.codebook[0], e0 / e0.norm(), atol=1e-6)
    assert torch.allclose(q.codebook[1], e1 / e1.norm(), atol=1e-6)
    assert torch.equal(q.codebook[2], torch.tensor([-1.0, 0.0]))  # unused: unchanged
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(3))


def test_kmeans_init_on_the_first_training_batch():
    """Samples around 3 directions, 3 codes: the first training forward puts one code on each direction; a second
    forward does not initialise again."""
    torch.manual_seed(0)
    centres = torch.eye(3)
    z = (centres[torch.arange(300) % 3] + 0.05 * torch.randn(300, 3)).view(1, 300, 3)
    q = beit2.NormEMAQuantizer(3, 3).train()
    assert not q.initted and torch.all(q.codebook == 0)
    q(z, torch.Generator().manual_seed(0))
    assert q.initted
    cos = q.codebook @ centres.t()  # [codes, centres]
    assert sorted(cos.argmax(1).tolist()) == [0, 1, 2] and cos.max(1).values.min() > 0.99
    init = beit2.kmeans_cosine(F.normalize(z[0], dim=-1), 3, torch.Generator().manual_seed(0))
    before = q.codebook.clone()
    q(-z, torch.Generator().manual_seed(1))  # a batch far from every code: only the EMA moves them, a little
    assert (q.codebook - before).norm(dim=1).max() < 0.2
    assert torch.allclose(init.norm(dim=1), torch.ones(3))


def test_straight_through_gradient():
    """z_q = z + sg(z_q - z): the value of the code, the gradient of the (normalised) input; the commitment loss
    pulls z towards its code."""
    codebook = F.normalize(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    q = quantizer(codebook).eval()
    z = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), requires_grad=True)
    w = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    z_q, loss, ids = q(z)
    assert torch.allclose(z_q, codebook[ids], atol=1e-6)
    (grad,) = torch.autograd.grad((z_q * w).sum(), z)
    z2 = z.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((F.normalize(z2, dim=-1) * w).sum(), z2)
    assert torch.allclose(grad, expected, atol=1e-6) and grad.abs().sum() > 0
    (g_commit,) = torch.autograd.grad(q(z)[1], z)
    step = F.normalize(z - 0.1 * g_commit, dim=-1)
    assert ((step - codebook[ids]) ** 2).sum() < ((F.normalize(z, dim=-1) - codebook[ids]) ** 2).sum()
    assert not q.codebook.requires_grad and "quantize.codebook" not in dict(tiny_vqkd().named_parameters())


# --------------------------------------------------------------------------------------------- sizes and masking
def test_paper_parameter_counts():
    """reference C1/C2: VQ-KD (1-layer decoder) 94,655,008 trainable, 3-layer 108,829,216; BEiT v2-B 106,143,056,
    v2-L 336,728,512; the exported encoder is BEiT v1's."""
    with torch.device("meta"):
        vqkd = beit2.VQKD(8192, 16, 224, "vit_base", 32, 1, 512)
        vqkd3 = beit2.VQKD(8192, 16, 224, "vit_base", 32, 3, 512)
        assert count_params(vqkd) == 94_655_008 and count_params(vqkd3) == 108_829_216
        base = beit2.BEiTv2(vqkd, 224, 16, "vit_base", 8192, layer_scale=0.1)
        large = beit2.BEiTv2(vqkd3, 224, 16, "vit_large", 8192, layer_scale=1e-5)
    assert count_params(base) == 106_143_056 and count_params(large) == 336_728_512
    assert count_params(base.encoder) + 768 == 85_666_128  # + the mask token: the v1 backbone
    assert (base.early_layers, large.early_layers) == (9, 21)
    rates = [b.drop_path.drop_prob for b in base.cls_pt_layers]
    assert rates == pytest.approx([0.1 * 9 / 11, 0.1 * 10 / 11])  # dpr[early_layers + i] of linspace(0, 0.1, 12)


def test_exact_mask_count_extends_the_v1_blocks():
    """v2's generator: the v1 blocks drawn from the same Random, then topped up to exactly 75 of 196."""
    v1, v2 = beit.MaskingGenerator(14, 75, 16), beit2.ExactMaskingGenerator(14, 75, 16)
    topped = 0
    for i in range(300):
        a, b = v1.draw(random.Random(i)), v2.draw(random.Random(i))
        assert b.sum() == 75 and np.all(b >= a)
        topped += int(a.sum() < 75)
        if a.sum() == 75:
            assert np.array_equal(a, b)
    assert topped > 0
    cfg = beit2.Config(img_size=32, patch_size=4)
    assert isinstance(beit2.mask_generator(cfg), beit2.ExactMaskingGenerator)
    assert (beit2.mask_generator(cfg)(16, random.Random(0)).sum(1) == 24).all()
    assert type(beit.mask_generator(beit.Config(img_size=32, patch_size=4))) is beit.MaskingGenerator


# ---------------------------------------------------------------------------------------------------- the model
def tiny_v2():
    tok = tiny_vqkd()
    torch.manual_seed(0)
    return beit2.BEiTv2(tok, 16, 4, "vit_nano", 64, drop_path=0.0, early_layers=1)


def test_aggregation_loss_on_masked_positions_only():
    m = tiny_v2().eval()
    imgs, view = torch.randn(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 2, 5]] = mask[1, [0, 9, 15]] = True
    ids = m.tokenizer.get_codebook_indices(view)
    with torch.no_grad():
        loss, acc = m(imgs, view, mask, 3)
        main, agg = m.forward_branches(imgs, mask)
        expected = (F.cross_entropy(m.lm_head(main[mask]), ids[mask]) + F.cross_entropy(m.lm_head(agg[mask]), ids[mask]))
        assert torch.equal(main, m.forward_encoder(imgs, mask))  # the main branch is BEiT's
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert acc.item() == pytest.approx((m.lm_head(main[mask]).argmax(-1) == ids[mask]).float().mean().item())
    assert_loss_ignores_visible_targets(m, imgs, view, mask, 3, ids, loss, changed=(1, 9))


def test_aggregation_branch_reads_early_states_and_is_absent_from_the_encoder():
    """The branch: [the last block's cls token, the patch states after block early_layers] through the 2 extra blocks
    (the shared relative position bias) and the shared final norm. Evaluation and encoder.pth never see it."""
    m = tiny_v2().eval()
    imgs, mask = torch.randn(2, 3, 16, 16), torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    enc = m.encoder
    with torch.no_grad():
        main, agg = m.forward_branches(imgs, mask)
        w = mask.unsqueeze(-1).float()
        x = enc.prepend_cls(enc.embed(imgs) * (1 - w) + m.mask_token * w)  # [B, 1+N, D]
        bias = enc.rel_pos_bias()
        early = enc.blocks[0](x, bias)  # early_layers = 1
        last = enc.blocks[1](early, bias)
        y = torch.cat([last[:, :1], early[:, 1:]], dim=1)
        for block in m.cls_pt_layers:
            y = block(y, bias)
        assert torch.allclose(agg, enc.norm(y)[:, 1:], atol=1e-6)
        assert torch.allclose(main, enc.norm(last)[:, 1:], atol=1e-6)
        feats = enc.forward_features(imgs)
        for p in m.cls_pt_layers.parameters():
            p.add_(0.1)
        main2, agg2 = m.forward_branches(imgs, mask)
        assert torch.equal(main, main2) and not torch.allclose(agg, agg2)
        assert torch.equal(feats, enc.forward_features(imgs))  # evaluation never runs the branch
    state = enc.state_dict()
    assert not any("cls_pt" in k for k in state) and "mask_token" not in state
    extra = count_params(m) - count_params(enc)
    assert extra == 64 + 64 * 64 + 64 + count_params(m.cls_pt_layers)  # mask token, head, the two blocks
    assert len(m.cls_pt_layers) == 2 and m.cls_pt_layers[0].gamma_1 is not None


# -------------------------------------------------------------------------------------------------- the teacher
def repository_encoder(tmp_path, img_size=16, patch_size=4):
    """An encoder.pth + config.json as mae.py writes them (a fresh MAE encoder: the architecture is what counts)."""
    import mae
    torch.manual_seed(0)
    enc = mae.MAE(img_size, patch_size, "vit_nano", 32, 1, 2).encoder
    torch.save(enc.state_dict(), tmp_path / "encoder.pth")
    (tmp_path / "config.json").write_text(json.dumps({"model": "vit_nano", "img_size": img_size,
                                                      "patch_size": patch_size}))
    return enc.eval(), tmp_path / "encoder.pth"


def test_repository_teacher_targets_and_grid_mismatch(tmp_path):
    enc, path = repository_encoder(tmp_path)
    teacher = beit2.load_teacher(str(path))
    view = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = enc.forward_features((view - mean) / std)[:, 1:]  # final-normed patch tokens
    tok = tiny_vqkd(target_dim=64).use_teacher(teacher)
    tok.train()
    targets = tok.targets(view)
    assert targets.shape == (2, 16, 64) and torch.allclose(targets, expected, atol=1e-5)
    assert not teacher.training and not targets.requires_grad
    assert not any(k.startswith("teacher") for k in tok.state_dict())  # tokenizer.pth holds VQ-KD alone
    assert count_params(tok) == sum(map(count_params, (tok.encoder, tok.encode_task_layer, tok.decoder,
                                                       tok.decode_task_layer)))
    assert count_params(teacher) == 0 and count_params(teacher, trainable=False) == count_params(enc, trainable=False)
    with pytest.raises(UserError, match=r"grid 4 x 4 .* is not the tokenizer's and BEiT's 8 x 8"):
        tiny_vqkd(img_size=32, target_dim=64).use_teacher(teacher)
    cfg = beit2.Config(img_size=32, patch_size=4, model="vit_nano", vocab_size=64, teacher=str(path),
                       vqkd_codebook_dim=8)
    with pytest.raises(UserError, match="grid"):
        beit2.new_vqkd(cfg)
    with pytest.raises(UserError, match="needs --teacher|give --teacher"):
        beit2.new_vqkd(beit2.Config(img_size=16, patch_size=4, model="vit_nano"))


def test_timm_teacher_needs_weights_on_disk(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # nothing cached here
    with pytest.raises(UserError, match="not on disk"):
        beit2.load_teacher("vit_base_patch16_clip_224.openai")
    with pytest.raises(UserError, match="neither a file nor a timm model"):
        beit2.load_teacher("no_such_model_x")
    # weights on disk (here: a file written now) -> targets = the final-normed patch tokens
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224").eval()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    monkeypatch.setattr(beit2, "timm_weights_on_disk", lambda name: str(tmp_path / "w.pth"))
    teacher = beit2.load_teacher("vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    assert teacher.grid == (14, 14) and teacher.dim == 192
    view = torch.rand(1, 3, 224, 224)
    cfg = ref.pretrained_cfg
    x = (view - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher(view), ref.forward_features(x)[:, 1:], atol=1e-5)
    with pytest.raises(UserError, match="grid 14 x 14"):
        tiny_vqkd(target_dim=192).use_teacher(teacher)


# ------------------------------------------------------------------------------------------------------- the CLI
V2_TINY = TINY + ["--vocab-size", "64", "--vqkd-codebook-dim", "8", "--tokenizer-epochs", "1",
                  "--tokenizer-batch-size", "16"]


@pytest.fixture(scope="module")
def mae_teacher(tmp_path_factory):
    """A teacher as the issue asks: the encoder.pth of a short mae.py run (2 steps)."""
    out = tmp_path_factory.mktemp("mae") / "run"
    run_script("mae.py", *TINY, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
               "--max-steps", "2", "--out", out, env=ONE_THREAD)
    return out / "encoder.pth"


def test_cli_beit_v2_end_to_end_with_a_mae_teacher_on_two_processes(mae_teacher, tmp_path):
    """mae.py wrote encoder.pth (a few steps); `beit2.py --teacher it` under torchrun (2 gloo
    processes) trains VQ-KD -- the quantizer's k-means init (all-gathered) and EMA statistics (all-reduced) inside
    DDP's forward; codebook usage and perplexity logged -- and pre-trains BEiT v2 (exact masks, aggregation) from
    one command; the replicas end identical."""
    import os
    import subprocess
    import sys
    out = tmp_path / "v2"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(30500 + (hash(str(out)) % 1000)), str(ROOT / "beit2.py"), *V2_TINY, "--teacher",
                           str(mae_teacher), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 1: vqkd tokenizer" in proc.stdout and "BEiT v2 vit_nano/4" in proc.stdout
    assert "exactly 6 of 16 patches masked" in proc.stdout
    for name in ("tokenizer.pth", "tokenizer_e0.png", "checkpoint.pth", "encoder.pth", "recon_e1.png",
                 "results.json"):
        assert (out / name).is_file(), name
    (tok_epoch,) = read_log(out, "tokenizer_epoch")
    assert {"rec", "commit", "perplexity", "codes_used"} <= set(tok_epoch)
    assert 1 <= tok_epoch["perplexity"] <= 64 and 0 < tok_epoch["codes_used"] <= 1
    assert 0 < tok_epoch["rec"] < 2 and tok_epoch["commit"] >= 0
    saved = torch.load(out / "tokenizer.pth", weights_only=True)
    assert saved["kind"] == "vqkd" and saved["complete"] and saved["config"]["teacher"] == str(mae_teacher)
    assert saved["config"]["target_dim"] == 64 and not any(k.startswith("teacher") for k in saved["model"])
    assert saved["model"]["quantize.initted"]
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == list(range(4))  # 64 images / (16 x 2 ranks) x 2 epochs
    assert steps[0]["loss"] == pytest.approx(2 * math.log(64), rel=0.1)  # two cross-entropies near ln V at init
    (done,) = read_log(out, "done")
    assert done["world_size"] == 2 and done["replicas_identical"] is True
    state = torch.load(out / "encoder.pth", weights_only=True)
    assert not any("cls_pt" in k or "tokenizer" in k for k in state) and "mask_token" not in state
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tokenizer"] == f"{out}/tokenizer.pth" and cfg["teacher"] == str(mae_teacher)
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 4 and results["tokenizer"]["codes_used"] == tok_epoch["codes_used"]


def test_bad_v2_flags_are_one_line_errors(tmp_path):
    for bad in (["--teacher", str(tmp_path / "none.pth")], ["--vqkd-model", "vit_x"], ["--vqkd-decay", "1"],
                ["--early-layers", "13"], ["--head-layers", "0"]):
        with pytest.raises(UserError):
            parse_config(beit2.Config, beit2.PRESETS, ["--data", "imagenet", *bad])
