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
from common.training import parse_config, resolve_amp
from common.vit import count_params
from conftest import ROOT, TINY, assert_loss_ignores_visible_targets, assert_same_law, read_log, run_script
from test_beit import mask_statistics

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


def test_training_forward_returns_the_codes_before_the_update():
    """In training the EMA moves the codebook after the lookup: z_q and the commitment loss use the codes as they
    were (official), the buffer holds the updated ones."""
    torch.manual_seed(0)
    codebook = F.normalize(torch.randn(8, 4), dim=-1)
    q = quantizer(codebook, decay=0.5).train()
    z = torch.randn(2, 6, 4)
    z_q, loss, ids = q(z)
    assert torch.allclose(z_q, codebook[ids], atol=1e-6) and not torch.allclose(q.codebook, codebook)
    assert loss.item() == pytest.approx(F.mse_loss(codebook[ids], F.normalize(z, dim=-1)).item(), rel=1e-5)


def kmeans_by_hand(samples, k, seed, iters=10, means=None):
    """Spherical k-means written out (official kmeans(use_cosine_sim=True)): k distinct random samples (torch.randperm
    of the generator), then `iters` rounds of: each sample to its most similar mean, each mean to the normalised
    average of its samples, a mean without samples kept."""
    if means is None:
        means = samples[torch.randperm(samples.shape[0], generator=torch.Generator().manual_seed(seed))[:k]].clone()
    for _ in range(iters):
        assign = [int(torch.argmax(torch.stack([torch.dot(s, m) for m in means]))) for s in samples]
        new = means.clone()
        for c in range(k):
            members = [s for s, a in zip(samples, assign) if a == c]
            if members:
                avg = torch.stack(members).mean(0)
                new[c] = avg / avg.norm()
        means = new
    return means


def test_kmeans_cosine_equals_the_algorithm_written_out():
    """Random unit samples (no clusters, so the means keep moving for many rounds), more codes than the data fill:
    the result of every round count equals the written-out algorithm."""
    torch.manual_seed(0)
    samples = F.normalize(torch.randn(60, 3), dim=-1)
    for iters in (1, 3, 10):
        ours = beit2.kmeans_cosine(samples, 12, torch.Generator().manual_seed(4), iters=iters)
        assert torch.allclose(ours, kmeans_by_hand(samples, 12, 4, iters), atol=1e-5), iters
    default = beit2.kmeans_cosine(samples, 12, torch.Generator().manual_seed(4))
    assert torch.allclose(default, kmeans_by_hand(samples, 12, 4, 10), atol=1e-5)
    assert not torch.allclose(default, kmeans_by_hand(samples, 12, 4, 3), atol=1e-3)  # ten rounds, not a few
    # fewer samples than codes: drawn with replacement (official sample_vectors); a repeated start gets no samples
    # (the first of equal means wins them all) and keeps its value
    few = beit2.kmeans_cosine(samples[:5], 8, torch.Generator().manual_seed(0), iters=0)
    idx = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(few, samples[:5][idx]) and idx.unique().numel() < 8
    few = beit2.kmeans_cosine(samples[:5], 8, torch.Generator().manual_seed(0))
    assert torch.allclose(few, kmeans_by_hand(samples[:5], 8, 0, means=samples[:5][idx].clone()), atol=1e-5)
    assert torch.allclose(few.norm(dim=1), torch.ones(8))


def quantizer_ddp_worker(out):
    """One rank of test_two_processes_quantize_as_one_with_the_whole_batch: its half of the batch through a fresh
    quantizer in training (k-means init, one EMA step); rank 0 saves both ranks' codebooks and ids."""
    import torch.distributed as dist
    from common.training import setup_distributed
    d = setup_distributed("cpu")
    z = torch.randn(2, 3, 20, 4, generator=torch.Generator().manual_seed(0))[d.rank]  # [B, N, d] of this rank
    q = beit2.NormEMAQuantizer(8, 4, decay=0.9).train()
    _, _, ids = q(z, torch.Generator().manual_seed(1))

    def gather(x):
        parts = [torch.empty_like(x) for _ in range(2)]
        dist.all_gather(parts, x.contiguous())
        return parts
    codebooks, all_ids = gather(q.codebook), gather(ids)
    restarting = beit2.NormEMAQuantizer(8, 4, decay=0.9, restart_after=1).train()  # every unused code, every step
    torch.manual_seed(d.rank)  # the ranks draw different picks: rank 0's must win on both
    for step in range(2):
        restarting(z[:1, :2], torch.Generator().manual_seed(1))  # 4 vectors on both ranks, 8 codes: some die
    restarted = gather(restarting.codebook)
    if d.rank == 0:
        torch.save({"codebooks": codebooks, "ids": torch.cat(all_ids), "restarted": restarted}, out)
    dist.destroy_process_group()


def test_two_processes_quantize_as_one_with_the_whole_batch(tmp_path):
    """torchrun x2 (gloo), half the batch each == one process with all of it: k-means on the batches of both ranks
    (all-gathered), the EMA from the counts and sums of both (all-reduced): the same codebook on both ranks, equal
    to the single process's, and the same ids."""
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, __file__, str(tmp_path / "q.pt")], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]  # (the two ranks torchrun would start, without its agent)
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
    got = torch.load(tmp_path / "q.pt", weights_only=True)
    z = torch.randn(2, 3, 20, 4, generator=torch.Generator().manual_seed(0))
    q = beit2.NormEMAQuantizer(8, 4, decay=0.9).train()
    _, _, ids = q(torch.cat([z[0], z[1]]), torch.Generator().manual_seed(1))  # rank 0's images first, as gathered
    assert torch.equal(got["ids"], ids)
    for codebook in got["codebooks"]:
        assert torch.allclose(codebook, q.codebook, atol=1e-6)
    assert torch.equal(*got["restarted"])  # dead-code restarts keep one codebook on both ranks
    assert (got["restarted"][0].norm(dim=1) > 0.99).all()  # (rank 0's picks: unit vectors, not the others' zeros)


def test_dead_codes_restart_at_vectors_of_the_batch():
    """restart_after = 2: a code no vector picked for 2 steps in a row moves onto a vector of the step's batch
    (where it is then the nearest code of that vector); a code in use stays where the EMA puts it; the idle counts
    are part of the state only where restarts are on. Off (0, the official quantizer), unused codes never move."""
    codebook = torch.eye(4)  # 4 unit codes
    batch = F.normalize(torch.tensor([[1.0, 0.1, 0, 0]]).repeat(6, 1) + 0.01 * torch.randn(
        6, 4, generator=torch.Generator().manual_seed(0)), dim=-1).view(1, 6, 4)  # all nearest to code 0
    for restart_after in (0, 2):
        q = beit2.NormEMAQuantizer(4, 4, restart_after=restart_after).train()
        q.codebook.copy_(codebook)
        q.initted.fill_(True)
        assert ("idle" in q.state_dict()) == (restart_after > 0)
        q(batch)
        assert torch.equal(q.codebook[1:], codebook[1:]) and q.idle.tolist() == ([0, 1, 1, 1] if restart_after else
                                                                                  [0, 0, 0, 0])
        q(batch)
        if restart_after:  # codes 1-3 were idle for 2 steps: each is now one of the batch's vectors
            assert q.idle.tolist() == [0, 0, 0, 0]
            for code in q.codebook[1:]:
                assert torch.isclose(batch[0] @ code, torch.tensor(1.0), atol=1e-6).any()
        else:
            assert torch.equal(q.codebook[1:], codebook[1:])
        assert (q.codebook[0] @ codebook[0]) > 0.99  # the code in use: moved a little towards the batch's mean


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


def test_cosine_loss_values():
    """1 - cos per token, averaged: 0 for the same direction (any lengths), 1 orthogonal, 2 opposite."""
    t = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert beit2.cosine_loss(3 * t, t).item() == pytest.approx(0.0, abs=1e-7)
    assert beit2.cosine_loss(-t, 5 * t).item() == pytest.approx(2.0)
    assert beit2.cosine_loss(t.flip(-1), t).item() == pytest.approx(1.0)
    assert beit2.cosine_loss(torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[10.0, 0.0]]])).item() == pytest.approx(
        1 - 1 / math.sqrt(2))
    rec, target = torch.randn(2, 5, 7), 4 * torch.randn(2, 5, 7)
    assert beit2.cosine_loss(rec, target).item() == pytest.approx(
        (1 - F.cosine_similarity(rec, target, dim=-1)).mean().item(), rel=1e-5)


class FixedTeacher(torch.nn.Module):
    """A stand-in teacher with fixed random features per image (targets depend on the image only)."""
    def __init__(self, grid=(4, 4), dim=24):
        super().__init__()
        self.grid, self.dim, self.name = grid, dim, "fixed"
        self.proj = torch.nn.Linear(3 * 16, dim)

    def forward(self, view):
        return self.proj(view.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2))


def test_prepare_initialises_the_codebook_as_the_first_training_forward():
    """Stage 1 calls `prepare` eagerly before each step, so that the step never branches on the codebook's init:
    it gives the codebook (and the first step's ids) that the quantizer's first training forward gives with the same
    generator, then does nothing; a tokenizer loaded from an uninitialised state is prepared again."""
    view = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    by_forward, prepared = (tiny_vqkd().use_teacher(FixedTeacher()).train() for _ in range(2))
    prepared.load_state_dict(by_forward.state_dict())
    with torch.no_grad():
        _, _, first = by_forward.quantize(by_forward.encode_unquantized(view), torch.Generator().manual_seed(3))
    assert prepared.prepare(view, torch.Generator().manual_seed(3), 0.0) == ()  # (no other input)
    assert prepared.quantize.ready() and prepared.quantize.initted
    _, second, _ = prepared(view)
    assert torch.equal(prepared.quantize.codebook, by_forward.quantize.codebook)  # k-means, then one EMA step
    assert torch.equal(first, second)
    codebook = prepared.quantize.codebook.clone()
    prepared.prepare(-view, torch.Generator().manual_seed(4), 0.5)
    assert torch.equal(prepared.quantize.codebook, codebook)  # initialised: left as it is
    prepared.load_state_dict(tiny_vqkd().state_dict())
    assert not prepared.quantize.ready()


def test_vqkd_forward_recomputed_by_hand():
    """VQ-KD's stage-1 loss written out: the encoder on the view mapped to [-1, 1], its patch tokens (cls dropped)
    through Linear-Tanh-Linear, l2-normalised, the code of highest cosine; the codes laid out as a [B, d, h, w] map
    (token i * w + j at (i, j)) through the decoder ViT (patch size 1) and its Linear-Tanh-Linear; loss = mean of
    1 - cos(reconstruction, teacher's features of the [0, 1] view) + the commitment MSE."""
    tok = tiny_vqkd()
    teacher = FixedTeacher()
    tok.use_teacher(teacher)
    tok.quantize.codebook.copy_(F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), dim=-1))
    tok.quantize.initted.fill_(True)
    tok.eval()  # no EMA step: the codebook stays as set
    view = torch.rand(2, 3, 16, 16)
    loss, ids, terms = tok(view)
    with torch.no_grad():
        x = tok.encoder.forward_features(2 * view - 1)[:, 1:]
        enc = tok.encode_task_layer
        z = enc[2](torch.tanh(enc[0](x)))
        z = z / z.norm(dim=-1, keepdim=True)
        codes = tok.quantize.codebook
        expected_ids = (z @ codes.t()).argmax(-1)
        z_q = codes[expected_ids]  # [B, N, d]
        grid = torch.zeros(2, 8, 4, 4)
        for i in range(4):
            for j in range(4):
                grid[:, :, i, j] = z_q[:, i * 4 + j]
        dec = tok.decode_task_layer
        rec = dec[2](torch.tanh(dec[0](tok.decoder.forward_features(grid)[:, 1:])))
        target = teacher(view)
        rec_loss = (1 - F.cosine_similarity(rec, target, dim=-1)).mean()
        commit = ((z_q - z) ** 2).mean()
    assert torch.equal(ids, expected_ids) and torch.equal(tok.get_codebook_indices(view), expected_ids)
    assert terms["rec"].item() == pytest.approx(rec_loss.item(), rel=1e-5)
    assert terms["commit"].item() == pytest.approx(commit.item(), rel=1e-5)
    assert loss.item() == pytest.approx(rec_loss.item() + commit.item(), rel=1e-5)
    assert tok.recon_error(view).item() == pytest.approx(rec_loss.item(), rel=1e-5)  # the same from the tokens
    assert isinstance(enc[1], torch.nn.Tanh) and isinstance(dec[1], torch.nn.Tanh)


def test_vqkd_official_init():
    """vqkd_vit: trunc_normal(0.02) on the position table, cls token and every Linear weight, zero biases, then
    attn.proj / mlp.fc2 of block l divided by sqrt(2 l); the task layers trunc_normal(0.02) with zero biases."""
    torch.manual_seed(0)
    vit = beit2.vqkd_vit(32, 4, 3, "vit_micro")  # width 192, 6 blocks
    assert vit.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert vit.cls_token.abs().max() > 0
    for layer, block in enumerate(vit.blocks, start=1):
        assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert w.std().item() * math.sqrt(2 * layer) == pytest.approx(0.02, rel=0.05), layer
        assert torch.all(block.mlp.fc1.bias == 0) and torch.all(block.attn.proj.bias == 0)
    layer = beit2.task_layer(192, 32)
    assert isinstance(layer[1], torch.nn.Tanh)
    for m in (layer[0], layer[2]):
        assert m.weight.std().item() == pytest.approx(0.02, rel=0.1) and torch.all(m.bias == 0)


def test_new_vqkd_takes_its_flags_and_the_teachers_width(tmp_path):
    """new_vqkd: stride = patch size (token grid = patch grid), --vqkd-model for the encoder and decoder width,
    --vqkd-codebook-dim, --vqkd-decoder-depth, --vqkd-decay, and the teacher's feature width as target_dim."""
    _, path = repository_encoder(tmp_path)  # a vit_nano teacher: 64-d features on a 4 x 4 grid
    cfg = beit2.Config(img_size=16, patch_size=4, model="vit_nano", vqkd_model="vit_micro", vocab_size=32,
                       vqkd_codebook_dim=12, vqkd_decoder_depth=2, vqkd_decay=0.9, teacher=str(path))
    tok = beit2.new_vqkd(cfg)
    assert tok.config == dict(vocab_size=32, stride=4, img_size=16, model="vit_micro", codebook_dim=12,
                              decoder_depth=2, target_dim=64, decay=0.9, teacher=str(path))
    assert tok.encoder.embed_dim == 192 and len(tok.decoder.blocks) == 2 and tok.quantize.decay == 0.9
    assert tok.quantize.codebook.shape == (32, 12) and tok.teacher is not None
    bare = beit2.new_vqkd(beit2.Config(img_size=16, patch_size=4, model="vit_nano", vocab_size=32), with_teacher=False)
    assert bare.config["target_dim"] == 64 and bare.config["model"] == "vit_nano" and bare.teacher is None


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


def test_batched_exact_masks_follow_the_official_law():
    """Training's masks (batched on the device) against v2's official per-image draws, 4000 images each at 14 x 14:
    exactly 75 per image, and the same distribution of the patches in the centre and of the block shapes by
    chi-square (test_beit's statistics); the top-up adds to the v1 blocks of the same generator state."""
    v2 = beit2.ExactMaskingGenerator(14, 75, 16)
    batched = v2.batched(4000, torch.Generator().manual_seed(0))
    rng = random.Random(0)
    official = torch.stack([torch.from_numpy(v2.draw(rng)).flatten().bool() for _ in range(4000)])
    assert (batched.sum(1) == 75).all()
    for ours, theirs in zip(mask_statistics(batched, 14), mask_statistics(official, 14)):
        assert_same_law(ours, theirs)
    v1 = beit.MaskingGenerator(14, 75, 16).batched(4000, torch.Generator().manual_seed(0))
    assert (batched >= v1).all() and (v1.sum(1) < 75).any()


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
    # the top-up: rng.sample of the free patches (row-major), continuing the Random the blocks were drawn from
    for i in range(300):
        rng = random.Random(i)
        a = v1.draw(rng)
        if a.sum() < 75:
            expected = a.copy()
            expected.flat[rng.sample(np.flatnonzero(a == 0).tolist(), 75 - int(a.sum()))] = 1
            assert np.array_equal(v2.draw(random.Random(i)), expected)
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
    # the accuracy is the main branch's (official mlm_acc_1): targets = its predictions give exactly 1
    with torch.no_grad():
        pred = m.lm_head(main).argmax(-1)
        assert not torch.equal(pred[mask], m.lm_head(agg).argmax(-1)[mask])  # the branches disagree somewhere
    m.tokenizer.get_codebook_indices = lambda v: pred
    with torch.no_grad():
        assert m(imgs, view, mask, 3)[1].item() == 1.0
    del m.tokenizer.get_codebook_indices
    assert_loss_ignores_visible_targets(m, imgs, view, mask, 3, ids, loss, changed=(1, 9))


def test_aggregation_branch_reads_early_states_and_is_absent_from_the_encoder():
    """The branch: [the last block's cls token, the patch states after block early_layers] through the 2 extra blocks
    (the shared relative position bias) and the shared final norm. Evaluation and encoder.pth never see it."""
    m = tiny_v2().eval()
    imgs, mask = torch.randn(2, 3, 16, 16), torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    enc = m.encoder
    with torch.no_grad():
        enc.rel_pos_bias.relative_position_bias_table.normal_(0, 1)  # (zero at init: a missing bias would not show)
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


def test_aggregation_blocks_keep_the_default_init_rescaled_after_the_early_layers():
    """The extra blocks (official: built after the model's init) keep PyTorch's default Linear init, U(+-1/sqrt(fan
    in)), with attn.proj and mlp.fc2 divided by sqrt(2 l) for l = early_layers + 1, + 2; layer scale as the
    backbone's."""
    torch.manual_seed(0)
    m = beit2.BEiTv2(tiny_vqkd(), 16, 4, "vit_nano", 64, drop_path=0.0, layer_scale=0.5, early_layers=1)
    for layer, block in enumerate(m.cls_pt_layers, start=2):
        assert block.attn.qkv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 64), rel=0.05)
        for w in (block.attn.proj.weight, block.mlp.fc2.weight):
            fan_in = w.shape[1]
            assert w.std().item() * math.sqrt(2 * layer) == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.05)
        assert torch.all(block.gamma_1 == 0.5) and torch.all(block.gamma_2 == 0.5)


def test_build_model_takes_the_v2_flags():
    cfg = beit2.Config(img_size=16, patch_size=4, model="vit_nano", vocab_size=32, vqkd_codebook_dim=8, head_layers=3,
                       early_layers=1, layer_scale=0.25)
    m = beit2.build_model(cfg)
    assert len(m.cls_pt_layers) == 3 and m.early_layers == 1 and m.tokenizer.teacher is None
    assert torch.all(m.encoder.blocks[0].gamma_1 == 0.25) and torch.all(m.cls_pt_layers[2].gamma_2 == 0.25)
    assert m.lm_head.out_features == 32 and m.tokenizer.vocab_size == 32


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


def test_teacher_normalises_resizes_drops_prefix_tokens_and_projects():
    """Teacher.forward: (view - mean) / std, bicubic resize to the teacher's input size, forward_features, the
    `prefix_tokens` leading tokens dropped, then `proj` (CLIP's visual projection)."""
    class Model(torch.nn.Module):  # forward_features = the input's pixels as tokens, after 2 prefix tokens
        def forward_features(self, x):
            tokens = x.flatten(2).transpose(1, 2)  # [B, H W, 3]
            return torch.cat([torch.full_like(tokens[:, :2], 7.0), tokens], dim=1)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    proj = torch.nn.Linear(3, 5)
    teacher = beit2.Teacher(Model(), "stand-in", mean, std, (6, 6), (6, 6), 5, prefix_tokens=2, proj=proj)
    view = torch.rand(2, 3, 4, 4)
    x = (view - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x = F.interpolate(x, size=(6, 6), mode="bicubic", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(teacher(view), proj(x.flatten(2).transpose(1, 2)), atol=1e-6)
    assert not teacher.train().training


def test_beit_encoder_as_teacher(tmp_path):
    """A BEiT-style encoder.pth (layer scale, shared relative position bias, q/v biases, no position table) is read
    back as that architecture: the teacher gives its final-normed patch tokens."""
    torch.manual_seed(0)
    enc = beit.BEiT(beit.DVAE(64, 4, 8, 8), 16, 4, "vit_nano", 64).encoder.eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "gamma" in name or "bias" in name:
                p.normal_(0, 0.5)  # away from the constant init, so that a gain left at 1.0 would show
    torch.save(enc.state_dict(), tmp_path / "encoder.pth")
    (tmp_path / "config.json").write_text(json.dumps({"model": "vit_nano", "img_size": 16, "patch_size": 4}))
    teacher = beit2.load_teacher(str(tmp_path / "encoder.pth"))
    view = torch.rand(2, 3, 16, 16)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(teacher(view), enc.forward_features((view - mean) / std)[:, 1:], atol=1e-5)


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
    used = tok_epoch["codes_used"] * 64  # a fraction of 64 codes (rounded to 4 places): a whole number of codes,
    assert abs(used - round(used)) < 0.01 and tok_epoch["perplexity"] <= round(used) + 0.01  # >= the perplexity
    assert 0 < tok_epoch["rec"] < 2 and tok_epoch["commit"] >= 0
    # the values: loss = rec + commit at every step and over the epoch; the epoch's recon_error (1 - cos on the
    # fixed views, with the final tokenizer) recomputed here from tokenizer.pth and the teacher
    assert tok_epoch["loss"] == pytest.approx(tok_epoch["rec"] + tok_epoch["commit"], abs=2e-5)
    tok_steps = read_log(out, "tokenizer_step")
    assert [s["step"] for s in tok_steps] == [0, 1]  # 64 images / (16 x 2 ranks), one epoch
    assert all(s["loss"] == pytest.approx(s["rec"] + s["commit"], abs=3e-6) for s in tok_steps)
    run_cfg = json.loads((out / "config.json").read_text())
    tok, _ = beit.load_tokenizer(out / "tokenizer.pth", "vqkd", lambda c: beit2.VQKD(**c))
    tok.eval()
    fields = {k: v for k, v in run_cfg.items() if k in beit2.Config.__dataclass_fields__}
    views = beit.fixed_views(beit2.Config(**fields), type("R", (), {"device": torch.device("cpu")}), 16, 256)
    amp = resolve_amp(run_cfg["amp"], torch.device("cpu"))
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        rec = tok.decode_features(tok.quantize.codebook[tok.get_codebook_indices(views)]).float()
        target = tok.targets(views)
    recon = (1 - F.cosine_similarity(rec, target, dim=-1)).mean().item()
    assert tok_epoch["recon_error"] == pytest.approx(recon, rel=0.01, abs=1e-4)
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


def test_v2_main_steps_use_exact_masks_and_average_the_accuracy(tmp_path, monkeypatch, one_thread):
    """beit2.main()'s loop, in process, on a tokenizer file written here: every step draws BEiT v2's exact-count
    masks (6 of 16) from the generator of (seed, rank 0, step); an epoch's mlm_acc is the mean of its steps'
    accuracies. The monitors are skipped (report stubbed)."""
    import signal
    import sys
    from common.data import mix_seed
    tok = tiny_vqkd(target_dim=64)
    tok.quantize.codebook.copy_(F.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), dim=-1))
    tok.quantize.initted.fill_(True)
    path = tmp_path / "vqkd.pth"
    torch.save({"kind": "vqkd", "config": tok.config, "model": tok.state_dict(), "complete": True, "stats": {}}, path)
    calls = []
    real = beit2.pretraining_step

    def spy(model, batch, masks, generator):
        loss, acc = real(model, batch, masks, generator)
        calls.append(dict(seed=generator.initial_seed(), masks=masks, acc=acc.item(),
                          counts=masks.batched(batch[0].shape[0], torch.Generator().manual_seed(
                              generator.initial_seed())).sum(1).tolist()))  # the step's masks, drawn again
        return loss, acc
    monkeypatch.setattr(beit2, "pretraining_step", spy)
    # report without the monitors: results.json holds the method's own numbers (mlm_acc, tokenizer)
    monkeypatch.setattr(beit2, "report", lambda method, encoder, build_model, run, extra=None:
                        run.write_json("results.json", extra))
    out = tmp_path / "run"
    argv = [*V2_TINY, "--blr", "0.05", "--tokenizer", str(path), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["beit2.py", *argv])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        beit2.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert [c["seed"] for c in calls] == [mix_seed(0, 0, it) for it in range(8)]
    assert all(type(c["masks"]) is beit2.ExactMaskingGenerator and c["counts"] == [6] * 16 for c in calls)
    accs = [np.mean([c["acc"] for c in calls[:4]]), np.mean([c["acc"] for c in calls[4:]])]
    assert [e["mlm_acc"] for e in read_log(out, "epoch")] == pytest.approx(accs, abs=6e-6) and accs[1] > 0
    assert json.loads((out / "results.json").read_text())["mlm_acc"] == pytest.approx(accs[1], rel=1e-6)


def test_bad_v2_flags_are_one_line_errors(tmp_path):
    for bad in (["--teacher", str(tmp_path / "none.pth")], ["--vqkd-model", "vit_x"], ["--vqkd-decay", "1"],
                ["--early-layers", "13"], ["--head-layers", "0"]):
        with pytest.raises(UserError):
            parse_config(beit2.Config, beit2.PRESETS, ["--data", "imagenet", *bad])


if __name__ == "__main__":  # the worker of test_two_processes_quantize_as_one_with_the_whole_batch
    import sys
    quantizer_ddp_worker(sys.argv[1])
