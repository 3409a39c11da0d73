"""SiT / GMML: parameter counts, the corruption sampler, the two views, the losses, the teacher, timm compatibility,
synchronised BatchNorm and gathered negatives over 2 processes, the CLI end to end, exact resume, bench.py's row.

Run by pytest. Also the 2-process worker: `torchrun --nproc_per_node 2 tests/test_sit.py OUT` (see test_two_processes).
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sit  # noqa: E402
from common import UserError  # noqa: E402
from common.training import cosine_lr, parse_config  # noqa: E402
from common.vit import count_params  # noqa: E402
from conftest import ROOT, TINY, read_log, run_script  # noqa: E402

SIT_TINY = TINY + ["--head-hidden-dim", "64", "--out-dim", "32"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def config(*argv):
    return parse_config(sit.Config, sit.PRESETS, argv=list(map(str, argv)))[0]


def images(n, size, seed=0):
    """Distinct random 'normalised' images that are never 0 (so a zero-filled pixel is a corrupted one)."""
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) + 3.0


# ------------------------------------------------------------------------------------------------- model sizes
@pytest.mark.parametrize("model,total,encoder,cls_head,rec_head", [
    ("vit_tiny", 24_420_099, 5_524_416, 18_637_056, 258_627),
    ("vit_small", 41_827_587, 21_665_664, 19_423_488, 738_435),
    ("vit_base", 109_156_611, 85_798_656, 20_996_352, 2_361_603)])
def test_official_parameter_counts(model, total, encoder, cls_head, rec_head):
    """The official FullPipline(vit_*, CLSHead(D, 256), RECHead(D)) at 224 px, counted from Sara-Ahmed/SiT HEAD."""
    with torch.device("meta"):
        m = sit.SiT(224, 16, model)
    assert (count_params(m), count_params(m.encoder), count_params(m.cls_head), count_params(m.rec_head)) == (
        total, encoder, cls_head, rec_head)
    assert count_params(m.teacher) == 0 and count_params(m.teacher, trainable=False) == encoder + cls_head


# -------------------------------------------------------------------------------------------------- corruption
def corruption_types(x, corrupted, mask):
    """'drop' where every corrupted value is 0 (zeros fill), else 'replace'; [B] list."""
    m = mask.bool().expand_as(x)
    return ["drop" if (corrupted[i][m[i]] == 0).all() else "replace" for i in range(len(x))]


def test_corruption_covers_the_target_with_one_type_per_image():
    """Each image is either dropped (zeros) at >= 50 % of its pixels or replaced at >= 30 %, overshooting by less
    than one block (the sampler stops once the union reaches the target); about half are replaced; the pixels
    outside the mask are untouched and the mask is the same on the 3 channels."""
    cfg = config("--img-size", 32, "--patch-size", 4)
    x = images(256, 32)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(0))
    assert mask.shape == (256, 1, 32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(corrupted[~mask.bool().expand_as(x)], x[~mask.bool().expand_as(x)])
    kinds = corruption_types(x, corrupted, mask)
    covered = mask.mean(dim=(1, 2, 3))
    one_block = (int(0.3 * 32) - 1) ** 2 / 32 ** 2  # the largest block: 8 x 8 px of 32 x 32
    for kind, target in (("drop", 0.5), ("replace", 0.3)):
        c = covered[[k == kind for k in kinds]]
        assert c.min() >= target and c.max() < target + one_block, (kind, c.min(), c.max())
    assert abs(kinds.count("replace") / 256 - 0.5) < 0.13  # 4 sigma of a binomial(256, 0.5) share


def test_replace_blocks_come_from_another_image_at_the_same_coordinates():
    cfg = config("--img-size", 32, "--patch-size", 4)
    x = images(32, 32, seed=1)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(1))
    m = mask.bool().expand_as(x)
    partners = []
    for i, kind in enumerate(corruption_types(x, corrupted, mask)):
        if kind == "replace":
            same = [j for j in range(len(x)) if torch.equal(corrupted[i][m[i]], x[j][m[i]])]
            assert len(same) == 1, same  # every corrupted pixel is the pixel of one clean image, same place
            partners.append((i, same[0]))
    assert len(partners) >= 8 and sum(i != j for i, j in partners) >= len(partners) - 2  # itself only by chance
    assert len({j for _, j in partners}) > len(partners) // 2  # partners drawn per image


def test_noise_fill_and_a_fill_type_per_image():
    cfg = config("--img-size", 32, "--patch-size", 4, "--drop-type", "zeros-noise", "--replace-prob", 0)
    x = images(64, 32, seed=2)
    corrupted, mask = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(2))
    m = mask.bool().expand_as(x)
    zeros = [bool((corrupted[i][m[i]] == 0).all()) for i in range(64)]
    assert 16 <= sum(zeros) <= 48  # one of the two fills per image
    noise = torch.cat([corrupted[i][m[i]] for i in range(64) if not zeros[i]])
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # N(0, 1) in normalised space


def test_corruption_is_a_function_of_the_generator():
    cfg = config("--img-size", 32, "--patch-size", 4, "--drop-type", "noise")
    x = images(16, 32)
    a = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(5))
    b = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(5))
    c = sit.gmml_corrupt(x, cfg, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("align", [1, 4])
def test_block_sizes_and_the_patch_grid(align):
    """A target below one pixel draws exactly one block per image: sides 1 .. int(0.3 H) - 1 px without --align;
    with --align 4, sides and corners on the 4-px grid (H = 32: sides 4 or 8)."""
    n, H = 4000, 32
    mask = sit.sample_blocks(torch.full((n,), 0.01), H, H, align, torch.Generator().manual_seed(0), "cpu")
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # [n, H] each
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(mask.sum(dim=(1, 2)), h * w)  # one rectangle per image
    top, left = rows.float().argmax(1), cols.float().argmax(1)
    if align == 1:
        assert set(h.tolist()) == set(range(1, 9)) and set(w.tolist()) == set(range(1, 9))
        assert top.max() == H - 2  # official randint(0, H - 1): the last row is never a top edge
    else:
        assert set(h.tolist()) == {4, 8} and set(w.tolist()) == {4, 8}
        assert (top % 4 == 0).all() and (left % 4 == 0).all()


def test_bad_corruption_settings_are_one_line_errors():
    for argv, message in ((["--drop-perc", 1], "--drop-perc must be in (0, 1)"),
                          (["--drop-type", "zeros-blur"], "unknown --drop-type 'blur'"),
                          (["--img-size", 16, "--patch-size", 4, "--align"], "drop --align"),
                          (["--replace-prob", 1.5], "--replace-prob must be in [0, 1]")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            config(*argv)


# ----------------------------------------------------------------------------------------------------- views
def test_batched_blur_equals_torchvision_per_image():
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.3, 0.8, 1.2, 2.0])
    got = sit.gaussian_blur(x, sigma, 7)
    ref = torch.stack([TF.gaussian_blur(x[i], [7, 7], [sigma[i].item()] * 2) for i in range(4)])
    assert torch.allclose(got, ref, atol=1e-6)


def test_two_views_on_both_data_paths():
    """Resident: BatchedViews on the device; DataLoader: DataAugmentationSiT through PIL. Both give two normalised
    views per image, different from each other, with about 20 % grayscale images each."""
    from common.data import LoaderData, ResidentData, build_train_data
    from common.training import Dist
    cfg = config("--img-size", 16, "--patch-size", 4, "--subset", 512, "--batch-size", 256, "--workers", 0)
    dist = Dist(0, 1, 0, torch.device("cpu"))
    quiet = dict(log=lambda msg: None, transform=sit.DataAugmentationSiT(16), augment=sit.BatchedViews(16))
    resident = build_train_data(cfg, dist, sit.CROP_SCALE, **quiet)
    cfg.resident = False
    loader = build_train_data(cfg, dist, sit.CROP_SCALE, **quiet)
    assert isinstance(resident, ResidentData) and isinstance(loader, LoaderData)
    for data in (resident, loader):
        views = [torch.cat(v) for v in zip(*(v for v, _ in data.epoch(0)))]  # 2 x [512, 3, 16, 16]
        assert len(views) == 2 and all(v.shape == (512, 3, 16, 16) for v in views)
        assert not torch.equal(views[0], views[1])
        for v in views:
            rgb = v * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
                1, 3, 1, 1)  # back to [0, 1]
            assert rgb.min() > -1e-3 and rgb.max() < 1 + 1e-3
            gray = ((rgb - rgb.mean(1, keepdim=True)).abs().amax(dim=(1, 2, 3)) < 1e-2).float().mean()
            assert 0.12 < gray < 0.28, gray  # RandomGrayscale(0.2) (the synthetic images are colourful)


# ---------------------------------------------------------------------------------------------------- losses
def test_reconstruction_loss_ignores_uncorrupted_pixels():
    g = torch.Generator().manual_seed(0)
    target, recon = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) < 0.4).float()
    loss = sit.reconstruction_loss(recon, target, mask)
    assert sit.reconstruction_loss(recon + 100 * (1 - mask), target, mask) == pytest.approx(loss.item(), abs=1e-6)
    assert sit.reconstruction_loss(recon + 0.5 * mask, target, mask) != pytest.approx(loss.item(), abs=1e-3)
    m = mask.bool().expand_as(target)
    assert loss.item() == pytest.approx((recon - target).abs()[m].mean().item(), rel=1e-6)  # official indexing


def test_info_nce_equals_a_hand_computation_on_three_samples():
    q = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 3.0, 1.0]])
    k = torch.tensor([[2.0, 0.5, 1.0], [0.0, -1.0, 0.5], [1.0, 1.0, 1.0]])
    tau = 0.2
    total = 0.0
    for i in range(3):
        def cos(a, b):
            return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        logits = [cos(q[i].tolist(), k[j].tolist()) / tau for j in range(3)]
        total += -logits[i] + math.log(sum(math.exp(z) for z in logits))
    expected = total / 3 * 2 * tau
    assert sit.info_nce(q, k, tau).item() == pytest.approx(expected, rel=1e-6)
    # student view 1 against teacher view 2 and view 2 against view 1, summed
    s, t = torch.cat([q, k]), torch.cat([k.flip(0), q.flip(0)])
    assert sit.contrastive_loss(s, t, tau).item() == pytest.approx(
        (sit.info_nce(q, q.flip(0), tau) + sit.info_nce(k, k.flip(0), tau)).item(), rel=1e-6)


def tiny_sit(**kw):
    torch.manual_seed(0)
    return sit.SiT(**{**dict(img_size=16, patch_size=4, model="vit_nano", out_dim=32, head_hidden_dim=64), **kw})


def test_teacher_gets_no_gradient_and_moves_by_the_ema_rule():
    m = tiny_sit()
    assert m.teacher["encoder"].blocks[-1].drop_path.drop_prob == 0 and m.encoder.blocks[-1].drop_path.drop_prob > 0
    s_params, t_params = list(m.student_parameters()), list(m.teacher.parameters())
    assert len(t_params) == len(list(m.encoder.parameters())) + len(list(m.cls_head.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(s_params, t_params))  # the teacher starts as the student
    cfg = config(*SIT_TINY)
    x = images(4, 16) - 3
    loss = sit.training_loss(m, (x, x.flip(-1)), cfg, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in t_params)
    assert all(p.grad is not None for p in s_params)
    with torch.no_grad():
        for p in s_params:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in t_params]
    sit.update_teacher(m, 0.9)
    for t0, t1, s in zip(before, t_params, s_params):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-6)
    # the momentum schedule: cosine from 0.996 to 1 over the run
    assert cosine_lr(0, 0.996, 1.0, 0, 10) == 0.996 and cosine_lr(10, 0.996, 1.0, 0, 10) == 1.0
    assert cosine_lr(5, 0.996, 1.0, 0, 10) == pytest.approx(0.998)


def test_gradients_are_clipped_per_parameter():
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([6.0, 8.0, 0.0, 0.0]), torch.tensor([0.6, 0.8])  # norms 10 and 1
    total = sit.clip_gradients([a, b], 3.0)
    assert total.item() == pytest.approx(math.sqrt(101))
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)  # clipped on its own
    assert torch.equal(b.grad, torch.tensor([0.6, 0.8]))  # below the limit: untouched (a global clip would scale it)


def test_tiny_model_learns_one_batch():
    m = tiny_sit(lmbda=5.0)
    cfg = config(*SIT_TINY)
    coarse = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x = F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)  # smooth: corrupted pixels are predictable
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    first = last = None
    for i in range(60):
        loss, c_loss, r_loss = sit.training_losses(m, (x, x.flip(-1)), cfg, torch.Generator().manual_seed(i % 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sit.update_teacher(m, 0.99)
        first = first or (c_loss.item(), r_loss.item())
        last = (c_loss.item(), r_loss.item())
    assert last[1] < first[1] * 0.7 and last[0] < first[0] * 0.7, (first, last)


def test_encoder_loads_into_timm_with_same_features():
    timm = pytest.importorskip("timm")
    m = tiny_sit(img_size=32)
    ref = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2,
                                                           num_heads=2, num_classes=0)
    ref.load_state_dict(m.encoder.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    m.eval(), ref.eval()
    with torch.no_grad():
        assert torch.allclose(m.encoder.forward_features(x), ref.forward_features(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------ 2 processes
def ddp_case():
    """The 2-process comparison: a tiny SiT (no drop path, lmbda 0: the contrastive loss and its BatchNorms are
    under test; each rank's reconstruction loss is a mean over its own pixels, as officially) and 8 images."""
    model = tiny_sit(drop_path=0.0, lmbda=0.0)
    cfg = config(*SIT_TINY)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    corrupted, masks = zip(*(sit.gmml_corrupt(v, cfg, g) for v in views))
    return model, views, corrupted, masks


def sit_step(model, views, corrupted, masks):
    """Loss, backward, then the student's and teacher's embeddings (a second forward) and the running statistics."""
    loss, c_loss, _, _ = model(torch.cat(views), torch.cat(corrupted), torch.cat(masks))
    loss.backward()
    net = getattr(model, "module", model)
    with torch.no_grad():
        student = net.cls_head(net.reconstruct(torch.cat(corrupted))[0])
        teacher = net.teacher["cls_head"](net.teacher["encoder"].forward_features(torch.cat(views))[:, 0])
    grads = [p.grad for p in net.student_parameters()]
    stats = [b for n, b in net.named_buffers() if "running" in n]
    return loss.detach(), c_loss.detach(), student, teacher, grads, stats


def ddp_worker(out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from common.training import setup_distributed
    d = setup_distributed("cpu")
    model, views, corrupted, masks = ddp_case()
    part = slice(4 * d.rank, 4 * d.rank + 4)  # this rank's 4 of the 8 images, both views
    loss, c_loss, student, teacher, grads, stats = sit_step(DDP(model), *[[v[part] for v in t] for t in
                                                                       (views, corrupted, masks)])

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous())
        return parts

    def in_batch_order(t):  # [view 1 rank 0, view 2 rank 0], [.. rank 1] -> [view 1 ranks 0, 1, view 2 ranks 0, 1]
        a, b = gather(t)
        return torch.cat([a[:4], b[:4], a[4:], b[4:]])

    result = {"loss": sum(gather(loss)) / 2, "c_loss": sum(gather(c_loss)) / 2, "student": in_batch_order(student),
              "teacher": in_batch_order(teacher), "grads": grads, "stats": stats}
    if d.rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def torchrun(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29700 + os.getpid() % 1000), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **ONE_THREAD})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_equal_one_with_twice_the_batch(tmp_path):
    """torchrun x2 (gloo) with 4 images each == one process with all 8: the same loss (the negatives are the teacher
    embeddings of *both* ranks), the same embeddings and running statistics (the BatchNorms of both heads see the
    global batch) and the same gradients (DDP's average, through the synchronised statistics' backward)."""
    torchrun(Path(__file__), tmp_path / "ddp.pt")
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    loss, c_loss, student, teacher, grads, stats = sit_step(*ddp_case())
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert got["c_loss"].item() == pytest.approx(c_loss.item(), rel=1e-5)
    assert torch.allclose(got["student"], student, atol=1e-4) and torch.allclose(got["teacher"], teacher, atol=1e-4)
    assert len(got["stats"]) == len(stats) == 12  # running mean and var of the 3 BNs of the student's and teacher's heads
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["stats"], stats))
    assert sum(g.norm() for g in grads) > 10  # gradients of order 0.1-1: atol 1e-4 is fp32 noise (the biases before
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(got["grads"], grads))  # a BN: 0 + noise)


def test_ddp_cli_two_processes(tmp_path):
    """sit.py under torchrun x2: the teacher and student stay identical on both ranks (EMA included), one writer."""
    out = tmp_path / "run"
    torchrun(ROOT / "sit.py", *SIT_TINY, "--epochs", "1", "--out", out)
    steps = read_log(out, "step")
    assert [s["step"] for s in steps] == [0, 1]  # 64 images / (16 x 2 ranks)
    done = read_log(out, "done")
    assert len(done) == 1 and done[0]["world_size"] == 2 and done[0]["replicas_identical"] is True
    assert json.loads((out / "config.json").read_text())["lr"] == pytest.approx(2e-3 * 32 / 256)


# ------------------------------------------------------------------------------------------- CLI and resume
def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_cli_end_to_end_and_exact_resume(tmp_path):
    """8 steps in one go writes the files of a run; 3 steps, stop, resume to 8 gives bitwise the same per-step losses
    and final weights, the teacher's included (drop path draws from the global generator; corruption from the step)."""
    full, part = tmp_path / "full", tmp_path / "part"
    proc = run_script("sit.py", *SIT_TINY, "--out", full, env=ONE_THREAD)
    for name in ("config.json", "log.jsonl", "checkpoint.pth", "encoder.pth", "recon_e0.png", "recon_e1.png",
                 "results.json"):
        assert (full / name).is_file(), name
    results = json.loads((full / "results.json").read_text())
    assert results["global_step"] == 8 and set(results["eval"]["random_init"]) == {"knn_cls", "knn_mean",
                                                                                 "linear_cls", "linear_mean"}
    epochs = read_log(full, "epoch")
    assert len(epochs) == 2 and all(e["contrastive"] > 0 and e["reconstruction"] > 0 for e in epochs)
    assert "contrastive" in proc.stdout and "replace (30%)" in proc.stdout
    run_script("sit.py", *SIT_TINY, "--max-steps", 3, "--out", part, env=ONE_THREAD)
    run_script("sit.py", *SIT_TINY, "--out", part, "--resume", "auto", env=ONE_THREAD)
    losses = {s["step"]: s["loss"] for s in read_log(full, "step")}
    assert sorted(losses) == list(range(8))
    assert {s["step"]: s["loss"] for s in read_log(part, "step")} == losses
    a, b = load(full / "checkpoint.pth")["model"], load(part / "checkpoint.pth")["model"]
    assert any(k.startswith("teacher.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["teacher.encoder.cls_token"], a["encoder.cls_token"])  # the teacher lags the student
    enc = load(full / "encoder.pth")
    assert all(torch.equal(enc[k], a["encoder." + k]) for k in enc)


# ------------------------------------------------------------------------------------------------------ bench
def test_bench_row_counts_both_views_and_the_teacher(monkeypatch):
    """bench.py's row: trainable parameters of the student, and forward FLOPs = student (encoder + both heads) and
    teacher (encoder + contrastive head) on the 2B views, plus the 2 x 2 InfoNCE logits matmuls (B x B x C each)."""
    import bench
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(bench, "PRECISIONS", bench.PRECISIONS[:1])  # fp32 only: bf16 is emulated (slow) on AVX2
    args = bench.parse_args(["--model", "vit_nano", "--img-size", "16", "--patch-size", "4", "--batch-size", "4",
                             "--steps", "1", "--no-compile", "--device", "cpu"])
    cfg = bench.method_config(sit, args)
    row = bench.bench_method(sit, cfg, args, torch.device("cpu"))
    torch.manual_seed(0)
    m = sit.build_model(cfg)
    assert row["params"] == count_params(m) and row["tokens_per_img"] == 2 * 16 and row["fp32"]["img_s"] > 0

    def flops(forward):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            forward()
        return counter.get_total_flops()

    x = torch.randn(8, 3, 16, 16)
    student = flops(lambda: (lambda cls, recon: (m.cls_head(cls), recon))(*m.reconstruct(x)))
    teacher = flops(lambda: m.teacher["cls_head"](m.teacher["encoder"].forward_features(x)[:, 0]))
    logits = 2 * (2 * 4 * 4 * cfg.out_dim)
    assert row["fwd_gflop_per_img"] * 4 * 1e9 == pytest.approx(student + teacher + logits, rel=1e-9)


if __name__ == "__main__":  # the worker of test_two_processes_equal_one_with_twice_the_batch
    ddp_worker(sys.argv[1])
