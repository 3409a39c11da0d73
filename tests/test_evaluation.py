"""common/evaluation.py: kNN, linear probe, layer-wise lr decay, the fine-tuning classifier, image grids."""
import json

import pytest
import torch
from PIL import Image

from common.evaluation import Classifier, knn_accuracy, layer_decay_groups, layer_id, linear_probe, save_image_grid
from common.vit import VisionTransformer
from conftest import TINY, run_script


def clustered(n_per_class, num_classes, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_knn_and_linear_probe_on_separable_and_random_features():
    xtr, ytr = clustered(50, 5, 16, 0.5, 0)
    xva, yva = clustered(20, 5, 16, 0.5, 1)
    assert knn_accuracy(xtr, ytr, xva, yva, 5) == 100.0
    assert linear_probe(xtr, ytr, xva, yva, 5, epochs=30, batch_size=64) > 95.0
    g = torch.Generator().manual_seed(5)
    rand_x, rand_y = torch.randn(1000, 16, generator=g), torch.randint(0, 5, (1000,), generator=g)
    assert knn_accuracy(rand_x[:500], rand_y[:500], rand_x[500:], rand_y[500:], 5) < 30.0  # chance is 20 %


def test_knn_weighted_vote_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.1, 1.0]])
    # k = 3: two far neighbours of class 0 against one very close neighbour of class 1; exp(sim / 0.07) decides
    assert knn_accuracy(train, labels, test, torch.tensor([1]), 2, k=3) == 100.0


def test_layer_decay_map_and_scales():
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    model = Classifier(enc, 10)
    assert layer_id("encoder.patch_embed.proj.weight", 3) == 0 and layer_id("encoder.cls_token", 3) == 0
    assert layer_id("encoder.blocks.2.mlp.fc1.weight", 3) == 3 and layer_id("head.weight", 3) == 4
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["encoder.patch_embed.proj.weight"])] == 0.5 ** 4
    assert scale_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.5 ** 3
    assert scale_of[id(named["head.weight"])] == 1.0
    assert wd_of[id(named["encoder.cls_token"])] == 0.0 and wd_of[id(named["encoder.blocks.0.norm1.weight"])] == 0.0
    assert wd_of[id(named["head.weight"])] == 0.05
    assert "encoder.pos_embed" not in {n for n, p in named.items() if id(p) in scale_of}  # frozen here


def test_classifier_pools_mean_before_final_norm():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    clf = Classifier(enc, 3)
    imgs = torch.randn(2, 3, 16, 16)
    tokens = enc.run_blocks(enc.prepend_cls(enc.embed(imgs)))
    assert torch.allclose(clf(imgs), clf.head(clf.fc_norm(tokens[:, 1:].mean(1))), atol=1e-6)
    assert clf.head.weight.abs().max() < 1e-4  # MAE's trunc_normal(2e-5) head


def test_image_grid(tmp_path):
    rows = [torch.rand(3, 3, 8, 8), torch.zeros(3, 3, 8, 8)]
    save_image_grid(rows, tmp_path / "g.png", "caption", labels=["a", "b"])
    img = Image.open(tmp_path / "g.png")
    assert img.size[0] > 3 * 8 * 12 and img.size[1] > 2 * 8 * 12  # upscaled x12 for 8 px tiles


def test_cli_finetune(tmp_path):
    out = tmp_path / "run"
    run_script("mae.py", *TINY, "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--out", out,
               "--epochs", "1", "--finetune-epochs", "1")
    top1 = json.loads((out / "results.json").read_text())["finetune_top1"]
    assert top1 == pytest.approx(top1) and 0.0 <= top1 <= 100.0
