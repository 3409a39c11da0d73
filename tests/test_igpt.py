"""iGPT: parameter counts, official init, palette and quantisation, causal and BERT masking, KV-cache sampling,
learning, and the CLI end to end (train, resume, --eval-only, one-line errors)."""
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, read_log, run_script
import igpt
from igpt import ImageGPT, dequantize, kmeans, param_count_formula, quantize, sample
from common.vit import count_params


def tiny_igpt(objective="ar", n_px=4, vocab=8, model="igpt_nano", seed=0):
    """A small model with a random (not zero) output matrix, so that logits depend on the input."""
    torch.manual_seed(seed)
    m = ImageGPT(n_px=n_px, model=model, vocab_size=vocab, objective=objective).eval()
    torch.nn.init.normal_(m.wtet.weight, std=0.5)
    m.palette.copy_(torch.rand(vocab, 3) * 2 - 1)
    return m


# the paper's sizes: (model, the paper's / download.py's "parameter counts are s:76M, m:455M, l:1362M", the exact count
# of the official model's trainable variables); 512 colours, 32 x 32 = 1024 positions
PAPER = [("igpt_s", 76, 76_571_648), ("igpt_m", 455, 455_157_760), ("igpt_l", 1362, 1_362_250_752)]


@pytest.mark.parametrize("model,paper_m,exact", PAPER)
def test_paper_parameter_counts(model, paper_m, exact):
    """Exact count = L (12 D^2 + 2 D) + D (2 K + n_ctx + 2): per block q, k, v, c_proj (4 D^2), the MLP (8 D^2) and
    two norm gains; then wte and wtet (K x D each), wpe (n_ctx x D), ln_f and sos (D each); no biases. These are
    exactly the variables of openai/image-gpt src/model.py (wpe, wte, wtet, sos, h{i}/{ln_1,ln_2}/g,
    attn/{q,k,v,c_proj}_proj, mlp/{c_fc,c_proj}/w, ln_f/g; clf/wclf exists only with --clf), i.e. what its
    utils.count_parameters() sums over tf.trainable_variables().
    The truth about "76M": the released figures are these exact counts truncated to whole millions, for all three
    (76.57 -> 76, 455.16 -> 455, 1362.25 -> 1362). So M and L are within 0.05 % of the figure, but S is 0.75 % above
    it, and no faithful reading brings S within 0.5 %: BERT (no sos) 76,571,136, +0.75 %; with the ImageNet
    classifier (--clf, 1000 x D) 77,083,648, +1.4 %; without the embeddings (blocks + ln_f) 75,522,560, -0.63 %.
    Only dropping a tensor the official model trains gets there (wpe: 76,047,360; wte tied to wtet: 76,309,504)."""
    with torch.device("meta"):
        m = ImageGPT(n_px=32, model=model, vocab_size=512)
    dim, depth, _ = igpt.IGPT_SIZES[model]
    assert count_params(m) == param_count_formula(dim, depth, 512, 1024) == exact
    assert exact // 10 ** 6 == paper_m  # the paper's figure: truncated, not rounded (S would round to 77)
    assert abs(exact / (paper_m * 1e6) - 1) < (0.0076 if model == "igpt_s" else 0.0005)
    with torch.device("meta"):
        bert = ImageGPT(n_px=32, model=model, vocab_size=512, objective="bert")
    assert count_params(bert) == exact - dim  # BERT has no start token
    blocks_and_ln_f = depth * (12 * dim * dim + 2 * dim) + dim
    assert count_params(m.h) + count_params(m.ln_f) == blocks_and_ln_f


def test_official_init_and_no_biases():
    torch.manual_seed(0)
    m = ImageGPT(n_px=16, model="igpt_mini", vocab_size=64)  # D 256, 8 blocks
    D, L = 256, 8
    assert torch.count_nonzero(m.wtet.weight) == 0  # zero-initialised logits
    assert m.wpe.std().item() == pytest.approx(0.01, rel=0.05)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    attn = m.h[3].attn
    assert attn.c_attn.weight.std().item() == pytest.approx(D ** -0.5, rel=0.05)
    assert attn.c_proj.weight.std().item() == pytest.approx((D * L) ** -0.5, rel=0.05)
    assert m.h[3].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert not [n for n, _ in m.named_parameters() if n.endswith("bias")]
    assert all(torch.equal(n.weight, torch.ones(D)) for n in (m.h[0].ln_1, m.h[0].ln_2, m.ln_f))


def test_norm_and_activation_are_the_official_ones():
    x = torch.randn(3, 5, 32)
    norm = igpt.rms_norm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    expected = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-5) * norm.weight  # official `norm`
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert not torch.allclose(norm(x), F.layer_norm(x, (32,), norm.weight), atol=1e-3)  # not mean-centred
    assert torch.allclose(igpt.QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_quantize_nearest_colour_in_raster_order():
    torch.manual_seed(0)
    palette = torch.rand(7, 3) * 2 - 1
    x = torch.rand(2, 3, 3, 5) * 2 - 1  # [B, 3, H, W]
    tokens = quantize(x, palette)
    assert tokens.shape == (2, 15)
    for b, i, j in ((0, 0, 0), (1, 2, 4), (1, 1, 3)):
        d = ((x[b, :, i, j] - palette) ** 2).sum(-1)  # brute force
        assert tokens[b, i * 5 + j] == d.argmin()  # pixel (i, j) is token i * W + j
    # under bf16 autocast the distances must stay fp32 (else near ties flip)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(quantize(x, palette), tokens)
    # dequantize is the palette colour, back in [0, 1]
    x3 = torch.rand(1, 3, 4, 4) * 2 - 1
    rgb = dequantize(quantize(x3, palette), palette, 4)
    assert rgb.shape == (1, 3, 4, 4) and torch.allclose(rgb[0, :, 1, 2], (palette[quantize(x3, palette)[0, 6]] + 1) / 2)


def test_kmeans_finds_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([[-0.8, -0.8, -0.8], [0.8, -0.5, 0.0], [0.0, 0.7, -0.6], [0.6, 0.6, 0.9]])
    points = (true[torch.randint(4, (4000,), generator=g)] + 0.03 * torch.randn(4000, 3, generator=g))
    centres = kmeans(points, 4, seed=1)
    d = torch.cdist(true, centres)  # each true centre has a found one within 0.01
    assert d.min(1).values.max() < 0.01
    assert torch.equal(centres, kmeans(points, 4, seed=1))
    lum = centres @ torch.tensor([0.299, 0.587, 0.114])
    assert torch.all(lum[1:] >= lum[:-1])  # sorted dark to light


def test_causal_mask_hides_the_future():
    """Changing pixel j never changes the logits at positions <= j (position i predicts x_i from x_<i); it does
    change position j + 1."""
    m = tiny_igpt()
    x = torch.randint(8, (2, 16))
    with torch.no_grad():
        base = m.logits(x)
        for j in (0, 5, 14):
            y = x.clone()
            y[:, j] = (y[:, j] + 3) % 8
            out = m.logits(y)
            assert torch.allclose(out[:, : j + 1], base[:, : j + 1], atol=1e-6, rtol=0), j
            assert (out[:, j + 1] - base[:, j + 1]).abs().max() > 1e-3, j


def test_start_token_shift_and_ar_loss():
    m = tiny_igpt()
    x = torch.randint(8, (3, 16))
    with torch.no_grad():
        logits = m.logits(x)
        h0 = m.embed(x)
    assert torch.allclose(logits[0, 0], logits[1, 0]) and torch.allclose(logits[0, 0], logits[2, 0])  # sos only
    assert torch.allclose(h0[:, 0], m.sos + m.wpe[0])
    assert torch.allclose(h0[:, 3], m.wte(x[:, 2]) + m.wpe[3])  # position 3 reads x_2
    expected = F.cross_entropy(logits.flatten(0, 1), x.flatten())  # nats per token, mean over all positions
    assert m.forward_loss(x, logits).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bert_zero_embedding_no_causal_mask_loss_on_hidden_only():
    m = tiny_igpt("bert")
    x = torch.randint(8, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [3, 9]] = True
    with torch.no_grad():
        base = m.logits(x, mask)
        y = x.clone()
        y[:, 9] = (y[:, 9] + 1) % 8  # a hidden token: its value is never seen
        assert torch.allclose(m.logits(y, mask), base, atol=1e-6)
        y = x.clone()
        y[:, 12] = (y[:, 12] + 1) % 8  # a visible token later in raster order changes earlier positions
        assert (m.logits(y, mask)[:, 2] - base[:, 2]).abs().max() > 1e-3
        ce = F.cross_entropy(base.flatten(0, 1), x.flatten(), reduction="none").view(2, 16)
        assert m.forward_loss(x, base, mask).item() == pytest.approx(ce[:, [3, 9]].mean().item(), rel=1e-6)
        # the BERT mask of training_loss hides about 15 %
        cfg = igpt.Config(model="igpt_nano", img_size=32, n_px=32, palette_size=8, objective="bert")
        noise = torch.rand(4, 1024, generator=torch.Generator().manual_seed(0))
        assert abs(m.bert_mask(noise).float().mean().item() - cfg.bert_mask_prob) < 0.02


@pytest.mark.parametrize("prompt_len", [0, 7])
def test_kv_cache_sampling_equals_full_recompute(prompt_len):
    m = tiny_igpt(n_px=5, vocab=8)
    prompt = torch.randint(8, (3, prompt_len))
    a = sample(m, prompt, torch.Generator().manual_seed(1), use_cache=True)
    b = sample(m, prompt, torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :prompt_len], prompt)
    assert len(set(map(tuple, a.tolist()))) == 3  # three different images (it really samples)
    c = sample(m, prompt, torch.Generator().manual_seed(2), use_cache=True)
    assert not torch.equal(a, c)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = ImageGPT(n_px=4, model="igpt_nano", vocab_size=8)
    x = torch.randint(8, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(150):
        loss = m.forward_loss(x, m.logits(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(8), rel=1e-5)  # zero output matrix: uniform over 8 colours
    assert losses[-1] < losses[0] / 8, (losses[0], losses[-1])


def test_training_loss_tokenizes_images():
    """training_loss (what main() and bench.py call) resizes to n_px, quantises, and returns the AR loss."""
    m = tiny_igpt(n_px=4)
    cfg = igpt.Config(model="igpt_nano", img_size=8, n_px=4, palette_size=8)
    imgs = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        loss = igpt.training_loss(m, imgs, cfg, torch.Generator().manual_seed(0))
        x = quantize(igpt.to_unit_range(imgs, 4), m.palette)
        assert x.shape == (2, 16)
        assert loss.item() == pytest.approx(m.forward_loss(x, m.logits(x)).item(), rel=1e-6)


def test_bench_runs_igpt_s_at_its_native_32_by_32():
    """bench.py's `--model vit_base` row is iGPT-S (24 x 512, 76.57 M) reading 224-px crops as 32 x 32 = 1024 tokens;
    a small ViT name is a decoder of that width and depth (vit_nano: 2 x 64)."""
    import bench
    cfg = bench.method_config(igpt, bench.parse_args(["--model", "vit_base", "--batch-size", "8"]))
    assert (cfg.model, cfg.img_size, cfg.res, cfg.batch_size) == ("igpt_s", 224, 32, 8)
    assert igpt.tokens_per_image(cfg) == 1024 and igpt.bench_label(cfg) == "igpt_s 32x32 tokens of 224px"
    with torch.device("meta"):
        assert count_params(igpt.build_model(cfg)) == 76_571_648
    cfg = bench.method_config(igpt, bench.parse_args(["--model", "vit_nano", "--batch-size", "2"]))
    m = igpt.build_model(cfg)
    assert m.n_ctx == 32 * 32 and m.embed_dim == 64 and len(m.h) == 2


def test_palette_file_round_trip(tmp_path):
    p = torch.rand(5, 3) * 2 - 1
    torch.save(p, tmp_path / "p.pt")
    assert torch.equal(igpt.load_palette(str(tmp_path / "p.pt")), p)
    import numpy as np
    np.save(tmp_path / "centers.npy", p.double().numpy())  # the official kmeans_centers.npy format
    assert torch.allclose(igpt.load_palette(str(tmp_path / "centers.npy")), p)
    torch.save(p * 3, tmp_path / "bad.pt")
    with pytest.raises(igpt.UserError, match="outside"):
        igpt.load_palette(str(tmp_path / "bad.pt"))


def run_inprocess(argv, capsys):
    """igpt.py's cli(main) in this process: (exit code, stderr)."""
    old = sys.argv
    sys.argv = ["igpt.py", *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as e:
            igpt.cli(igpt.main)
    finally:
        sys.argv = old
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--objective", "gpt"], "unknown --objective"),
    (["--model", "igpt_xxl"], "unknown model"),
    (["--n-px", "512"], "--n-px 512"),
    (["--palette", "/nonexistent/palette.pt"], "does not exist"),
    (["--crop-min", "0.9", "--crop-max", "0.5"], "--crop-min"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    code, err = run_inprocess(["--out", tmp_path / "run", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


TINY = ["--model", "igpt_nano", "--img-size", "8", "--palette-size", "8", "--palette-images", "32", "--subset", "64",
        "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "1", "--workers", "0", "--log-every", "1",
        "--n-samples", "2"]


def test_cli_end_to_end_resume_and_eval_only(tmp_path):
    out = tmp_path / "run"
    run_script("igpt.py", *TINY, "--out", out, "--max-steps", "3")  # stops inside epoch 0 (4 steps per epoch)
    assert json.loads((out / "results.json").read_text())["global_step"] == 3
    palette = torch.load(out / "palette.pt")
    proc = run_script("igpt.py", *TINY, "--out", out, "--resume", "auto")
    assert "resumed" in proc.stdout + proc.stderr
    for name in ("config.json", "log.jsonl", "checkpoint.pth", "encoder.pth", "palette.pt", "samples_e0.png",
                 "samples_e1.png", "results.json"):
        assert (out / name).is_file(), name
    assert torch.equal(torch.load(out / "palette.pt"), palette)  # the checkpoint's palette, not a new k-means
    assert palette.shape == (8, 3) and palette.abs().max() <= 1
    results = json.loads((out / "results.json").read_text())
    assert results["global_step"] == 8  # 64 images / batch 16 x 2 epochs
    assert [s["step"] for s in read_log(out, "step")] == [0, 1, 2, 3, 4, 5, 6, 7]
    for which in ("pretrained", "random_init"):
        ev = results["eval"][which]
        assert [r["layer"] for r in ev["layers"]] == [0, 1, 2]  # embedding + 2 blocks
        assert all(0 <= r["linear"] <= 100 and 0 <= r["knn"] <= 100 for r in ev["layers"])
        assert 0 <= ev["best_layer"] <= 2 and ev["depth"] == 2
        assert ev["val_bits_per_dim"] == pytest.approx(ev["val_nats_per_token"] / math.log(2) / 3, abs=1e-3)
    assert results["eval"]["random_init"]["val_nats_per_token"] == pytest.approx(math.log(8), abs=1e-3)
    assert results["eval"]["pretrained"]["val_nats_per_token"] < math.log(8) - 0.01  # it learned something
    # --eval-only from the checkpoint gives the same numbers
    # (and --finetune-epochs adds the joint generative + classification fine-tuning)
    run_script("igpt.py", *TINY, "--out", out, "--eval-only", "--resume", out / "checkpoint.pth",
               "--finetune-epochs", "1")
    again = json.loads((out / "results.json").read_text())
    assert again["eval"] == results["eval"]
    ft = again["finetune"]
    assert 0 <= ft["top1"] <= 100 and 0 < ft["val_nats_per_token"] < 2 * math.log(8)


def torchrun_igpt(*args, timeout=300):
    """igpt.py under `torchrun --nproc_per_node 2` on CPU (gloo), one thread per process."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + os.getpid() % 1000), str(ROOT / "igpt.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_processes_pretrain_evaluate_finetune(tmp_path):
    """torchrun x2 (gloo) through the palette, pre-training, the per-layer evaluation and the joint fine-tune: the
    palette is the one k-means of the data (as one process fits it), the replicas stay identical, files are
    written once, and the evaluation gathered over 2 ranks equals the evaluation of the same checkpoint in one
    process (feature shards gathered in rank order, nats summed over ranks)."""
    out = tmp_path / "ddp"
    torchrun_igpt(*TINY, "--blr", "1e-3", "--finetune-epochs", "1", "--out", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["lr"] == pytest.approx(1e-3 * 16 * 2 / 128)  # blr x global batch / 128
    assert [s["step"] for s in read_log(out, "step")] == list(range(4))  # 64 images / (16 x 2) x 2 epochs
    assert len(read_log(out, "epoch")) == 2  # one writer
    (done,) = read_log(out, "done")
    assert done["world_size"] == 2 and done["replicas_identical"] is True
    # the palette: the same k-means as one process computes (same images, same seed), broadcast from rank 0
    one = igpt.Config(**{k: v for k, v in cfg.items() if k in igpt.Config.__dataclass_fields__})
    single = SimpleNamespace(device=torch.device("cpu"), dist=SimpleNamespace(world_size=1), log=lambda msg: None)
    assert torch.equal(torch.load(out / "palette.pt"), igpt.fit_palette(one, single))
    results = json.loads((out / "results.json").read_text())
    assert results["eval"]["pretrained"]["train_images"] == 64 and results["eval"]["pretrained"]["val_images"] == 64
    ft = results["finetune"]
    assert 0 <= ft["top1"] <= 100 and 0 < ft["val_nats_per_token"] < 2 * math.log(8)
    # the same checkpoint evaluated by one process
    run_script("igpt.py", *TINY, "--eval-only", "--resume", out / "checkpoint.pth", "--out", tmp_path / "one",
               env={"OMP_NUM_THREADS": "1"})
    again = json.loads((tmp_path / "one" / "results.json").read_text())
    assert again["eval"] == results["eval"]
