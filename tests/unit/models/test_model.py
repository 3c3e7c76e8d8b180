import pytest
import torch
import torchvision

from helpers import tiny_config
from pirl.methods import NPID, PIRL, build_method
from pirl.models.heads import ImageHead, JigsawHead
from pirl.models.trunk import build_trunk, feature_dim, stage_features


@pytest.mark.parametrize("mlp", [False, True])
def test_head_shapes(mlp):
    f = ImageHead(512, 128, mlp=mlp, hidden=64)
    g = JigsawHead(512, 128, num_patches=9, mlp=mlp, hidden=64)
    assert f(torch.randn(4, 512)).shape == (4, 128)
    assert g(torch.randn(36, 512)).shape == (4, 128)
    if not mlp:  # the paper's heads: no ReLU or BN anywhere
        assert isinstance(f.proj, torch.nn.Linear)
        assert isinstance(g.patch_proj, torch.nn.Linear) and g.concat_proj.in_features == 9 * 128


def test_jigsaw_head_depends_on_patch_order():
    g = JigsawHead(32, 8)
    x = torch.randn(9, 32)
    assert not torch.allclose(g(x), g(x[torch.randperm(9)]))


def test_cifar_stem_is_exactly_3x3_stride_1_without_maxpool():
    trunk = build_trunk("resnet18", "cifar")
    c = trunk.conv1
    assert (c.kernel_size, c.stride, c.padding, c.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(trunk.maxpool, torch.nn.Identity)
    assert stage_features(trunk, torch.randn(1, 3, 32, 32), ("res5",))["res5"].shape == (1, 512, 4, 4)


def test_trunk_keys_are_torchvision_keys():
    trunk = build_trunk("resnet50")
    reference = torchvision.models.resnet50()
    assert set(trunk.state_dict()) == {k for k in reference.state_dict() if not k.startswith("fc.")}
    assert feature_dim(trunk) == 2048 and feature_dim(build_trunk("resnet34")) == 512


def _batch(n=8, patch=4, size=16):
    return {
        "image": torch.randn(n, 3, size, size),
        "patches": torch.randn(n, 9, 3, patch, patch),
        "index": torch.arange(n),
    }


def test_only_the_image_embedding_writes_the_bank():
    method = build_method(tiny_config(), 32)
    captured = {}
    for name in ("f", "g"):
        method.encoder.heads[name].register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o))
    before = method.bank.memory.clone()
    out = method.training_step(_batch(), step=0)
    method.after_step(out)
    f_unit = torch.nn.functional.normalize(captured["f"].detach(), dim=1)
    expected = torch.nn.functional.normalize(0.5 * before[:8] + 0.5 * f_unit, dim=1)
    assert torch.allclose(method.bank.memory[:8], expected, atol=1e-6)
    assert torch.equal(method.bank.memory[8:], before[8:])  # rows of other images untouched


def test_lambda_zero_equals_npid():
    cfg = tiny_config("loss.lam=0")
    torch.manual_seed(0)
    pirl = PIRL(cfg, 32)
    npid = NPID(tiny_config("loss.method=npid"), 32)
    npid.encoder.trunk.load_state_dict(pirl.encoder.trunk.state_dict())
    npid.encoder.heads["f"].load_state_dict(pirl.encoder.heads["f"].state_dict())
    batch = _batch()
    a, b = pirl.training_step(batch, step=3), npid.training_step(batch, step=3)
    assert torch.allclose(a.loss, b.loss) and torch.allclose(a.bank_update[1], b.bank_update[1])


@pytest.mark.parametrize("form", ["infonce", "npid_nce", "paper_nce"])
@pytest.mark.parametrize("pretext", ["jigsaw", "rotation", "jigsaw_rotation"])
def test_a_step_runs_and_gives_gradients_to_both_heads(form, pretext):
    method = build_method(tiny_config(f"loss.form={form}", f"loss.pretext={pretext}"), 32)
    batch = _batch()
    batch["rotated"] = torch.randn(8, 3, 16, 16)
    out = method.training_step(batch, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert method.encoder.heads["f"].proj.weight.grad is not None
    g = method.encoder.heads["g"]
    assert (g.proj if pretext == "rotation" else g.concat_proj).weight.grad is not None
    if form == "npid_nce":
        assert torch.isfinite(method.criterion.log_z)  # Z estimated once and kept


def test_no_weight_decay_on_batchnorm_and_bias():
    method = build_method(tiny_config(), 32)
    decay, no_decay = method.parameter_groups(1e-4)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_head_bn_centres_the_embeddings_of_a_batch():
    f = ImageHead(64, 16, out_bn=True)
    g = JigsawHead(64, 16, num_patches=9, out_bn=True)
    features = torch.rand(32, 64) + 3.0  # all positive, like a random ResNet's pooled features
    for out in (f(features), g(torch.rand(9 * 32, 64) + 3.0)):
        assert out.mean(0).abs().max() < 1e-5 and torch.allclose(out.var(0, unbiased=False), torch.ones(16), atol=2e-2)
    plain = ImageHead(64, 16)(features)
    cos = torch.nn.functional.normalize(plain, dim=1) @ torch.nn.functional.normalize(plain, dim=1).T
    assert cos.mean() > 0.5  # without it every embedding shares one large direction
    method = build_method(tiny_config("model.head_bn=true"), 32)
    assert isinstance(method.encoder.heads["f"].out_norm, torch.nn.BatchNorm1d)
    assert isinstance(method.encoder.heads["g"].out_norm, torch.nn.BatchNorm1d)


def test_bank_init_from_features_writes_f_of_each_image_and_keeps_bn_statistics():
    method = build_method(tiny_config("model.head_bn=true"), 16)
    images = torch.randn(16, 3, 16, 16)
    running = {k: v.clone() for k, v in method.encoder.state_dict().items() if "running" in k}
    method.encoder.eval()
    method.init_bank_from_features([(images[:8], torch.arange(8)), (images[8:], torch.arange(8, 16))])
    assert not method.encoder.training and method.bank.momentum == 0.5  # both restored
    assert all(torch.equal(v, method.encoder.state_dict()[k]) for k, v in running.items())
    method.encoder.train()
    with torch.no_grad():
        expected = torch.cat(
            [torch.nn.functional.normalize(method.encoder({"f": x})["f"], dim=1) for x in (images[:8], images[8:])]
        )
    assert torch.allclose(method.bank.memory, expected, atol=1e-5)
