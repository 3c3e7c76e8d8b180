"""The baselines beside PIRL/NPID++ (Jigsaw, Rotation, Supervised) and PIRL's rotation pretexts, end to end."""

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torch.utils.data import default_collate

from helpers import random_source, tiny_config
from pirl.checkpoint import export, latest_checkpoint, load_checkpoint
from pirl.data.dataset import ViewDataset
from pirl.data.sources import ArraySource
from pirl.errors import PirlError
from pirl.methods import METHODS, Jigsaw, Supervised, build_method, hamming_permutations
from pirl.methods.rotation import rotate_all
from pirl.train import train

BASELINES = ("jigsaw", "rotation", "supervised")


def _min_distance(perms: torch.Tensor) -> int:
    d = (perms[:, None] != perms[None]).sum(-1)
    d.fill_diagonal_(perms.shape[1] + 1)
    return int(d.min())


def test_hamming_permutation_set_is_distinct_far_apart_and_deterministic():
    perms = hamming_permutations(1000)
    assert perms.shape == (1000, 9) and perms.dtype == torch.int64
    assert (perms.sort(1).values == torch.arange(9)).all()  # every row a permutation of the 9 patches
    assert len({tuple(p) for p in perms.tolist()}) == 1000
    gen = torch.Generator().manual_seed(0)
    random_sets = [torch.rand(1000, 9, generator=gen).argsort(1) for _ in range(2)]
    assert _min_distance(perms) >= 5 > max(_min_distance(r) for r in random_sets)
    from pirl.methods.jigsaw import _hamming_permutations

    small = hamming_permutations(30)
    _hamming_permutations.cache_clear()  # recomputed from scratch: the same sets
    assert torch.equal(small, hamming_permutations(30)) and torch.equal(small, perms[:30])  # greedy: a prefix
    assert len(hamming_permutations(24, 4).unique(dim=0)) == 24  # grid 2: all 4! orders
    assert _min_distance(hamming_permutations(20, 16)) > 10  # grid 4: chosen from a random pool


def test_rotation_labels_match_the_turn_applied():
    images = torch.randn(3, 3, 8, 8)
    turned, labels = rotate_all(images)
    assert turned.shape == (12, 3, 8, 8) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for i in range(12):
        assert torch.equal(turned[i], torch.rot90(images[i % 3], int(labels[i]), dims=(-2, -1)))
    corner = torch.zeros(1, 1, 4, 4)
    corner[..., 0, 3] = 1  # top right
    turned, _ = rotate_all(corner)
    assert turned[1, 0, 0, 0] == 1 and turned[2, 0, 3, 0] == 1 and turned[3, 0, 3, 3] == 1  # counter-clockwise


def _real_batch(method, n=8):
    """A batch made by the method's own views from a labelled source, as the trainer would."""
    dataset = ViewDataset(random_source(n), method.views(), seed=0)
    return default_collate([dataset[i] for i in range(n)])


@pytest.mark.parametrize("name", BASELINES)
def test_a_step_gives_a_finite_loss_and_gradients(name, one_thread):
    cfg = tiny_config(f"loss.method={name}", "loss.permutations=30")
    method = build_method(cfg, 8, random_source(8))
    assert method.bank is None and set(method.state_dict()) >= {"encoder.trunk.conv1.weight"}
    batch = _real_batch(method)
    batch.pop("bad")
    out = method.training_step(batch, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and 0 <= float(out.logs["acc"]) <= 1
    assert method.encoder.trunk.conv1.weight.grad is not None
    assert all(p.grad is not None for p in method.encoder.heads.parameters())
    method.after_step(out)  # nothing to write
    assert len(method.parameter_groups(1e-4)[0]["params"]) > 0


@pytest.fixture
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rotation_learns_a_trivially_learnable_case(one_thread):
    def banded(n):  # a bright band at the top: the turn is plain to see
        images = 0.3 * torch.randn(n, 3, 16, 16)
        images[:, :, :4] += 2.0
        return images

    torch.manual_seed(0)
    method = build_method(tiny_config("loss.method=rotation"), 4)
    images = banded(4)
    optimizer = torch.optim.SGD(method.parameter_groups(0.0), lr=0.05, momentum=0.9)
    losses = []
    for step in range(30):
        out = method.training_step({"image": images, "index": torch.arange(4)}, step)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[0] > 1.0 and sum(losses[-5:]) / 5 < 0.3 * losses[0], losses
    with torch.no_grad():  # new images (batch statistics, as in training): it learned the turn, not the 4 images
        assert float(method.training_step({"image": banded(16)}, 30).logs["acc"]) > 0.9


def test_supervised_needs_labels():
    unlabelled = ArraySource(np.zeros((16, 16, 16, 3), np.uint8))
    cfg = tiny_config("loss.method=supervised")
    with pytest.raises(PirlError, match="no labels"):
        build_method(cfg, 16, unlabelled)
    with pytest.raises(PirlError, match="labelled images"):
        Supervised(cfg, 16)
    method = build_method(cfg, 16, random_source(16, classes=3))
    assert method.encoder.heads["classifier"].out_features == 3
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([0, 1, -1, 2]), "index": torch.arange(4)}
    with pytest.raises(PirlError, match="image 2 has no label"):
        method.training_step(batch, 0)


def test_config_choices_cover_every_method_and_check_the_permutation_count():
    for name in METHODS:
        assert tiny_config(f"loss.method={name}").method.name == name
    with pytest.raises(PirlError, match="loss.method"):
        tiny_config("loss.method=colorization")
    for bad in ("loss.permutations=1", "loss.permutations=100001"):
        with pytest.raises(PirlError, match="loss.permutations"):
            tiny_config("loss.method=jigsaw", bad)
    with pytest.raises(PirlError, match=r"loss.permutations=25.*between 2 and 24"):
        tiny_config("loss.method=jigsaw", "data.grid=2", "data.jigsaw_crop=12", "loss.permutations=25")
    assert tiny_config("loss.permutations=0").method.permutations == 0  # ignored by the other methods


def test_jigsaw_checkpoint_keeps_its_permutations():
    cfg = tiny_config("loss.method=jigsaw", "loss.permutations=30")
    state = Jigsaw(cfg, 8).state_dict()
    assert torch.equal(state["_extra_state"], hamming_permutations(30))
    state["_extra_state"] = state["_extra_state"].flip(0)  # as if saved by a version that chose another set
    method = Jigsaw(cfg, 8)
    views = method.views()  # built before the resume, as in train()
    method.load_state_dict(state)
    assert torch.equal(views.permutations, state["_extra_state"])
    with pytest.raises(PirlError, match="30 permutations"):
        Jigsaw(tiny_config("loss.method=jigsaw", "loss.permutations=20"), 8).load_state_dict(state)


def _final(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))["method"]


@pytest.mark.parametrize("name", BASELINES)
def test_train_resume_and_export(tmp_path, name):
    source = random_source(16)
    cfg = tiny_config(f"loss.method={name}", "optim.epochs=2", "train.keep_checkpoints=10", "loss.permutations=30")
    train(cfg, source, tmp_path / "full", progress=False)
    (tmp_path / "split").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-e0001-s0000000.pt", tmp_path / "split")
    train(cfg, source, tmp_path / "split", resume=True, progress=False)
    full, split = _final(tmp_path / "full"), _final(tmp_path / "split")
    assert full.keys() == split.keys() and not any(k.startswith("bank.") for k in full)
    for key in full:
        torch.testing.assert_close(full[key], split[key], rtol=0, atol=0, msg=key)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all("acc" in r and np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")
    weights = load_file(export(tmp_path / "full", tmp_path / "exp") / "model.safetensors")
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(weights)  # strict: the trunk alone, bare torchvision keys
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["method"] == name


def test_supervised_train_on_unlabelled_data_stops_with_one_line(tmp_path):
    with pytest.raises(PirlError, match="no labels"):
        train(
            tiny_config("loss.method=supervised"),
            ArraySource(np.zeros((16, 16, 16, 3), np.uint8)),
            tmp_path / "run",
            progress=False,
        )


@pytest.mark.parametrize("pretext", ["rotation", "jigsaw_rotation"])
def test_pirl_with_rotation_pretexts_trains(tmp_path, pretext):
    summary = train(
        tiny_config(f"loss.pretext={pretext}", "optim.epochs=1"), random_source(16), tmp_path / "run", progress=False
    )
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(summary["loss"]) and all("loss_transformed" in r for r in rows if r["kind"] == "train")
    g = "encoder.heads.g.proj.weight" if pretext == "rotation" else "encoder.heads.g.concat_proj.weight"
    assert g in _final(tmp_path / "run")


def _bn_buffers(trunk) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trunk.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.mark.parametrize("pretext", ["jigsaw", "rotation"])
def test_transformed_bn_stats_false_keeps_the_running_stats_of_the_image_pass_alone(one_thread, pretext):
    import copy

    cfg = tiny_config(f"loss.pretext={pretext}", "loss.transformed_bn_stats=false")
    method = build_method(cfg, 8, random_source(8))
    batch = _real_batch(method)
    reference = copy.deepcopy(method.encoder.trunk)
    before = _bn_buffers(method.encoder.trunk)
    out = method.training_step(batch, step=0)
    out.loss.backward()
    reference(batch["image"])  # the image view alone, through an untouched copy of the trunk
    after, expected = _bn_buffers(method.encoder.trunk), _bn_buffers(reference)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the image pass did update them
    for k in after:
        torch.testing.assert_close(after[k], expected[k], rtol=1e-5, atol=1e-6)
    # the transformed term still trains the trunk, with batch statistics of its own
    assert float(out.logs["loss_transformed"]) > 0
    assert method.encoder.trunk.bn1.momentum == 0.1


def test_transformed_bn_stats_true_is_the_paper_mix_of_both_passes(one_thread):
    import copy

    cfg = tiny_config("loss.pretext=jigsaw")
    method = build_method(cfg, 8, random_source(8))
    batch = _real_batch(method)
    reference = copy.deepcopy(method.encoder.trunk)
    method.training_step(batch, step=0)
    reference(batch["image"])
    after, image_only = _bn_buffers(method.encoder.trunk), _bn_buffers(reference)
    assert not torch.allclose(after["bn1.running_mean"], image_only["bn1.running_mean"])
    assert int(after["bn1.num_batches_tracked"]) == 2  # patches, then image


# --------------------------------------------------------------------------- small contracts, by hand


def test_covariant_jigsaw_views_are_the_shuffled_patches_alone():
    from PIL import Image

    method = Jigsaw(tiny_config("loss.method=jigsaw", "loss.permutations=30"), 8)
    out = method.views()(Image.fromarray(np.full((40, 40, 3), 128, np.uint8)))
    assert set(out) == {"patches", "order", "permutation"}  # no image view: the method never uses one
    assert torch.equal(out["order"], method.permutations[int(out["permutation"])])


def test_a_jigsaw_checkpoint_of_another_size_is_refused_with_both_counts():
    state = Jigsaw(tiny_config("loss.method=jigsaw", "loss.permutations=30"), 8).state_dict()
    other = Jigsaw(tiny_config("loss.method=jigsaw", "loss.permutations=20"), 8)
    with pytest.raises(PirlError, match=r"has 30 permutations of 9 patches; this config has method.permutations=20, "):
        other.load_state_dict(state)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_npid_builds_the_configured_image_head_and_logs_its_one_term(head, one_thread):
    cfg = tiny_config("loss.method=npid", f"model.head={head}", "model.mlp_hidden=24", "model.embed_dim=16")
    method = build_method(cfg, 8, random_source(8))
    proj = method.encoder.heads["f"].proj
    if head == "mlp":
        assert [type(m) for m in proj] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
        assert proj[0].out_features == 24 and proj[2].out_features == 16
    else:
        assert isinstance(proj, torch.nn.Linear) and proj.out_features == 16
    out = method.training_step(_real_batch(method), 0)
    assert set(out.logs) == {"loss_image"} and float(out.logs["loss_image"]) == float(out.loss.detach())


def test_supervised_takes_its_classes_from_the_labels_and_names_what_is_missing():
    from types import SimpleNamespace

    cfg = tiny_config("loss.method=supervised")

    def source(labels, num_classes=0):
        return SimpleNamespace(labels=labels, num_classes=num_classes, name="the source")

    two = Supervised(cfg, 16, num_classes=2)  # two classes are enough
    assert two.num_classes == 2 and two.num_samples == 16
    with pytest.raises(PirlError, match="at least 2 classes; got 0$"):
        Supervised(cfg, 16)  # no classes given
    from_labels = Supervised.from_source(cfg, 12, source([0, 2, 1, 2]))  # a source that does not count them
    assert from_labels.num_classes == 3 and from_labels.num_samples == 12
    assert Supervised.from_source(cfg, 12, source([0, 1], num_classes=5)).num_classes == 5
    for labels in (None, [], [-1, -1]):
        with pytest.raises(PirlError, match=r"the source has no labels \(a folder needs one subfolder per class\)"):
            Supervised.from_source(cfg, 12, source(labels))
    with pytest.raises(PirlError, match="at least 2 classes; got 1"):  # labelled, but with one class
        Supervised.from_source(cfg, 12, source([0, 0, 0]))


# --------------------------------------------------------------------------- the shared base and the heads, by hand


def test_method_keys_are_refused_with_the_key_the_value_and_the_allowed_range():
    assert tiny_config("method.lam=1").method.lam == 1.0 and tiny_config("method.lam=0").method.lam == 0.0
    for lam in ("1.5", "-0.25"):
        with pytest.raises(PirlError) as err:
            tiny_config(f"method.lam={lam}")
        assert str(err.value) == f"bad config value method.lam={float(lam)}: must be in [0, 1]"
    with pytest.raises(PirlError) as err:
        tiny_config("method.pretext=colour")
    assert str(err.value) == (
        "bad config value method.pretext='colour': must be one of jigsaw, rotation, jigsaw_rotation"
    )
    # a 2x2 grid has 4! = 24 orders: both ends of [2, 24] are allowed, 1 and 25 are not
    grid2 = ("method.name=jigsaw", "data.grid=2", "data.jigsaw_crop=12")
    for count in (2, 24):
        assert tiny_config(*grid2, f"method.permutations={count}").method.permutations == count
    for count in (1, 25):
        with pytest.raises(PirlError) as err:
            tiny_config(*grid2, f"method.permutations={count}")
        assert str(err.value) == (
            f"bad config value method.permutations={count}: must be between 2 and 24 for data.grid=2"
        )


@pytest.fixture
def torchvision_resnet18_in_the_hub_cache(tmp_path, monkeypatch):
    """torch.hub's cache holding random weights under the name of torchvision's ResNet-18 weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(5)
    state = torchvision.models.resnet18().state_dict()
    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "torch" / "hub" / "checkpoints" / name)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_the_trunk_has_the_configured_stem_and_starts_from_model_init(torchvision_resnet18_in_the_hub_cache):
    cifar = build_method(tiny_config("method.name=npid", "model.stem=cifar"), 8).encoder.trunk
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, torch.nn.Identity)
    imagenet = build_method(tiny_config("method.name=npid"), 8).encoder.trunk
    assert imagenet.conv1.kernel_size == (7, 7) and isinstance(imagenet.maxpool, torch.nn.MaxPool2d)
    spec = "model.init=torchvision:ResNet18_Weights.IMAGENET1K_V1"
    trunk = build_method(tiny_config("method.name=npid", spec), 8).encoder.trunk.state_dict()
    assert set(trunk) == set(torchvision_resnet18_in_the_hub_cache)
    assert all(torch.equal(trunk[k], v) for k, v in torchvision_resnet18_in_the_hub_cache.items())


def test_parameter_groups_give_sgd_weight_decay_on_weights_and_none_on_norms_and_biases():
    method = build_method(tiny_config("method.name=npid", "model.head=mlp", "model.mlp_hidden=24"), 8)
    groups = torch.optim.SGD(method.parameter_groups(5e-4), lr=0.1).param_groups  # SGD's own default is 0
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    params = list(method.encoder.parameters())
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in params if p.ndim > 1}
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in params if p.ndim <= 1}


def test_the_bank_has_the_configured_seed_and_storage():
    from pirl.bank.build import build_bank

    method = build_method(tiny_config("method.name=npid", "train.seed=3", "bank.dtype=float16"), 12)
    assert method.bank.memory.dtype == torch.float16 and method.bank.seed == 3
    assert torch.equal(method.bank.memory, build_bank("replicated", 12, 16, 0.5, 3, "float16").memory)


@pytest.mark.parametrize(
    "exclude, shared, global_batch, offset, k",
    [
        (True, False, 8, 4, 11),  # D \ {I}: 11 of the 12 rows at most; this rank's half of a global batch of 8
        (False, False, None, 0, 12),  # all of D
        (False, True, None, 0, 12),  # one set for the batch
    ],
)
def test_bank_loss_draws_the_configured_negatives(exclude, shared, global_batch, offset, k):
    """More negatives asked for than the bank holds: as many as there are, with the bank's sampling options."""
    cfg = tiny_config(
        "method.name=npid",
        "bank.negatives=100",
        f"bank.exclude_positive={str(exclude).lower()}",
        f"bank.share_negatives={str(shared).lower()}",
    )
    method = build_method(cfg, 12)
    method.global_batch, method.batch_offset = global_batch, offset
    calls = []
    draw = method.bank.sample_negatives

    def spy(*args, **kwargs):
        calls.append((args[1:], kwargs))
        return draw(*args, **kwargs)

    method.bank.sample_negatives = spy
    emb = torch.nn.functional.normalize(torch.randn(4, 16), dim=1)
    indices = torch.tensor([0, 3, 5, 11])
    loss = method.bank_loss(emb, indices, step=7, term=1)
    options = {"shared": shared, "exclude_positive": exclude, "global_batch": global_batch, "offset": offset}
    assert calls == [((k, 7, 1), options)]
    negatives = draw(indices, k, 7, 1, **options)
    assert negatives.shape == ((k,) if shared else (4, k))
    assert torch.equal(loss, method.criterion(method.bank.score(emb, indices, negatives)))


@pytest.mark.parametrize("pretext", ["jigsaw", "rotation"])
def test_pirl_builds_f_and_g_from_the_model_config(pretext):
    common = ("model.embed_dim=16", "model.mlp_hidden=24", f"method.pretext={pretext}")
    mlp = build_method(tiny_config(*common, "model.head=mlp", "model.head_bn=true"), 8).encoder.heads
    plain = build_method(tiny_config(*common, "model.head=linear", "model.head_bn=false"), 8).encoder.heads
    g_proj = "proj" if pretext == "rotation" else "patch_proj"
    for proj in (mlp["f"].proj, getattr(mlp["g"], g_proj)):
        layers = [type(m) for m in proj]
        # the jigsaw's shared patch projection keeps VISSL's last ReLU
        assert layers[:3] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
        assert layers[3:] == ([torch.nn.ReLU] if proj is getattr(mlp["g"], "patch_proj", None) else [])
        assert proj[0].out_features == 24 and proj[2].out_features == 16
    for head in mlp.values():
        assert isinstance(head.out_norm, torch.nn.BatchNorm1d) and not head.out_norm.affine
    for proj in (plain["f"].proj, getattr(plain["g"], g_proj)):
        assert isinstance(proj, torch.nn.Linear) and proj.out_features == 16
    assert all(isinstance(head.out_norm, torch.nn.Identity) for head in plain.values())


def test_pirl_at_lambda_0_runs_no_transformed_pass_and_logs_how_close_f_and_g_are(one_thread):
    npid_like = build_method(tiny_config("method.lam=0"), 8, random_source(8))
    out = npid_like.training_step(_real_batch(npid_like), 0)
    # the patches never went through the trunk: one BatchNorm update, one term logged
    assert int(npid_like.encoder.trunk.bn1.num_batches_tracked) == 1 and set(out.logs) == {"loss_image"}

    method = build_method(tiny_config("method.lam=0.5"), 8, random_source(8))
    batch = _real_batch(method)
    out = method.training_step(batch, 0)
    assert set(out.logs) == {"loss_image", "loss_transformed", "sim_f_g"}
    with torch.no_grad():  # the same training-mode passes again: batch statistics, the same embeddings
        emb = method.encoder({"g": method.transformed_input(batch), "f": batch["image"]})
    cosines = (torch.nn.functional.normalize(emb["f"]) * torch.nn.functional.normalize(emb["g"])).sum(1)
    torch.testing.assert_close(out.logs["sim_f_g"], cosines.mean())
    assert -1 <= float(out.logs["sim_f_g"]) <= 1


def test_jigsaw_builds_its_permutations_and_head_from_the_config():
    grid2 = ("method.name=jigsaw", "data.grid=2", "data.jigsaw_crop=12", "method.permutations=10")
    common = (*grid2, "model.embed_dim=16", "model.mlp_hidden=24")
    method = build_method(tiny_config(*common, "model.head=mlp"), 8)
    assert method.num_samples == 8
    assert method.permutations.shape == (10, 4) and torch.equal(method.permutations, hamming_permutations(10, 4))
    head = method.encoder.heads["jigsaw"]
    assert [type(m) for m in head.patch_proj] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear, torch.nn.ReLU]
    assert head.patch_proj[0].out_features == 24 and head.patch_proj[2].out_features == 16
    assert (head.classifier.in_features, head.classifier.out_features) == (4 * 16, 10)
    linear = build_method(tiny_config(*common, "model.head=linear"), 8).encoder.heads["jigsaw"]
    assert isinstance(linear.patch_proj, torch.nn.Linear) and linear.patch_proj.out_features == 16


def test_rotation_classifies_four_turns():
    method = build_method(tiny_config("method.name=rotation"), 4)
    assert method.encoder.heads["rotation"].out_features == 4
