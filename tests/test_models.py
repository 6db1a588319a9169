"""Model registry and the tapped-network contract (see ncrobust/models/base.py).

Every registered model is checked on a batch of two 32x32 RGB images: logits, taps, penultimate
features and the classifier must agree with each other. Parameter counts are checked against the
reference implementations named in each test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ncrobust.models import TappedNet, create_model, list_models

MEAN3, STD3 = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def build(name: str, *, num_classes: int = 10, in_chans: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    return create_model(
        name,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        mean=[0.5] * in_chans,
        std=[0.25] * in_chans,
        **kwargs,
    )


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def forward_cache():
    """One eval-mode model and its three forward passes per registered name (built once)."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(0)
            model = create_model(name, num_classes=10, in_chans=3, image_size=32, mean=MEAN3, std=STD3).eval()
            x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = model(x)
                logits_t, taps = model(x, taps=True)
                feats = model.features(x)
            cache[name] = (model, x, logits, logits_t, taps, feats)
        return cache[name]

    return get


def test_registry_names():
    names = list_models()
    for name in ("mlp", "convnet", "cnn1d", "deep_linear", "preact_resnet18", "resnet18", "vgg11_bn", "wide_resnet", "wrn28_10", "wrn34_10"):
        assert name in names
    with pytest.raises(ValueError, match="unknown model 'resnet1000'"):
        build("resnet1000")


@pytest.mark.parametrize("name", list_models())
def test_contract(name, forward_cache):
    model, x, logits, logits_t, taps, feats = forward_cache(name)
    assert isinstance(model, TappedNet)
    assert logits.shape == (2, 10) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # model(x, taps=True) gives the same logits as model(x)
    torch.testing.assert_close(logits_t, logits, rtol=0, atol=0)
    # taps: ordered like tap_names, "penultimate" last, each batch-first and finite
    assert list(taps) == model.tap_names
    assert list(taps)[-1] == "penultimate"
    assert len(taps) >= 2
    for tap_name, act in taps.items():
        assert tap_name.isidentifier(), tap_name
        assert act.shape[0] == 2, (tap_name, act.shape)
        assert torch.isfinite(act).all(), tap_name
    penultimate = taps["penultimate"]
    assert penultimate.ndim == 2
    # the penultimate features, fed to the classifier, give the logits; features() gives them too
    torch.testing.assert_close(model.classifier(penultimate), logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats, penultimate, rtol=0, atol=0)
    # classifier is the last nn.Linear
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears[-1] is model.classifier
    assert model.classifier.in_features == penultimate.shape[1]


@pytest.mark.parametrize("name", list_models())
def test_input_gradient_and_normalisation(name, forward_cache):
    """Attacks need d(loss)/d(input) in pixel space; normalisation is the first layer."""
    model = forward_cache(name)[0]
    x = forward_cache(name)[1].clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor(MEAN3))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.tensor(STD3))


@pytest.mark.parametrize("name", list_models())
def test_bias_free_classifier(name, forward_cache):
    """``bias=False`` (every model): the classifier has no bias, so the logits are ``W h`` exactly;
    the default keeps the bias; a non-boolean is refused naming the option."""
    assert forward_cache(name)[0].classifier.bias is not None
    torch.manual_seed(0)
    model = build(name, bias=False).eval()
    assert model.classifier.bias is None
    x = forward_cache(name)[1]
    with torch.no_grad():
        logits, taps = model(x, taps=True)
    torch.testing.assert_close(logits, taps["penultimate"] @ model.classifier.weight.T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="bias must be true or false"):
        build(name, bias="no")


def test_deep_linear_is_linear_with_taps_at_every_layer():
    """No activation: the features are an affine map of the input (the normalisation is the only
    shift), so affine combinations of inputs map to the same combinations of features."""
    torch.manual_seed(0)
    model = build("deep_linear", depth=4, width=16, bias=False).eval()
    assert model.tap_names == ["layer1", "layer2", "layer3", "penultimate"]
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.ReLU)) for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3 * 32 * 32, 16), (16, 16), (16, 16), (16, 16), (16, 10)]
    assert n_params(model) == 3 * 32 * 32 * 16 + 3 * 16 * 16 + 16 * 10
    x1, x2, x3 = torch.rand(3, 1, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = model.double()
    with torch.no_grad():
        combined = model(x1 + 0.5 * x2 - 0.5 * x3, taps=True)[1]
        parts = [model(x, taps=True)[1] for x in (x1, x2, x3)]
    for tap in model.tap_names:
        torch.testing.assert_close(combined[tap], parts[0][tap] + 0.5 * parts[1][tap] - 0.5 * parts[2][tap])
    with_bn = build("deep_linear", depth=2, width=8, batch_norm=True)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.modules()) == 2
    assert build("deep_linear", depth=1, width=8).tap_names == ["penultimate"]


def test_preact_resnet18_parameters():
    # Su et al. (github.com/JingtongSu/robust_neural_collapse, preactresnet.py) = Rice et al.
    # (locuslab/robust_overfitting) PreActResNet18 with the final BatchNorm2d(512): 11,172,170.
    # kuangliu/pytorch-cifar's PreActResNet18 has no final BatchNorm: 11,171,146 = 11,172,170 - 2 * 512.
    model = build("preact_resnet18")
    assert model.variant == "cifar"
    assert n_params(model) == 11_172_170
    final_bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    assert final_bn.num_features == 512 and n_params(final_bn) == 2 * 512  # the difference to kuangliu's
    # Su et al.'s preactresnet_imagenet.py (7x7/2 stem + max-pool), used for 160 px ImageNette.
    model = build("preact_resnet18", image_size=160)
    assert model.variant == "imagenet"
    assert n_params(model) == 11_179_850
    assert n_params(build("preact_resnet18", image_size=160, variant="cifar")) == 11_172_170
    assert n_params(build("preact_resnet18", num_classes=100)) == 11_172_170 + 90 * 513


def test_resnet18_parameters():
    # kuangliu/pytorch-cifar ResNet18 = RobustBench's ResNet18 (architectures/resnet.py) = Madry-lab's
    # robustness CIFAR ResNet-18: 3x3 stem + BN, BasicBlocks with conv1x1 + BN shortcuts: 11,173,962.
    assert n_params(build("resnet18")) == 11_173_962
    assert n_params(build("resnet18", image_size=160)) == 11_173_962
    assert n_params(build("resnet18", num_classes=100)) == 11_173_962 + 90 * 513
    shortcuts = [m.shortcut for m in build("resnet18").modules() if getattr(m, "shortcut", None) is not None]
    assert len(shortcuts) == 3 and all(isinstance(s[1], nn.BatchNorm2d) for s in shortcuts)


def test_vgg11_bn_parameters():
    # kuangliu/pytorch-cifar VGG('VGG11') (conv bias, BatchNorm, one Linear(512, 10)): 9,231,114;
    # Su et al.'s vgg11_bn (CIFAR) and vgg11_bn_pool (ImageNette) differ from it only in pooling.
    assert n_params(build("vgg11_bn")) == 9_231_114
    assert n_params(build("vgg11_bn", image_size=160)) == 9_231_114
    assert n_params(build("vgg11_bn", num_classes=100)) == 9_231_114 + 90 * 513


def test_wide_resnet_parameters():
    # RobustBench / TRADES WideResNet(depth, num_classes=10, widen_factor=10, sub_block1=False)
    # (TRADES's models/wideresnet.py also builds an unused sub_block1; it is not counted here).
    assert n_params(build("wrn28_10")) == 36_479_194
    assert n_params(build("wrn34_10")) == 46_160_474
    assert n_params(build("wide_resnet", depth=34, widen_factor=10)) == 46_160_474
    small = build("wide_resnet", depth=10, widen_factor=1)
    assert small.tap_names == ["stage1_block1", "stage2_block1", "stage3_block1", "penultimate"]


def test_tap_names():
    assert build("preact_resnet18").tap_names == [
        *(f"stage{s}_block{b}" for s in (1, 2, 3, 4) for b in (1, 2)),
        "penultimate",
    ]
    assert build("resnet18").tap_names == build("preact_resnet18").tap_names
    assert build("vgg11_bn").tap_names == ["block1", "block2", "block3", "block4", "block5", "penultimate"]
    assert build("wrn28_10").tap_names == [
        *(f"stage{s}_block{b}" for s in (1, 2, 3) for b in (1, 2, 3, 4)),
        "penultimate",
    ]
    assert len(build("wrn34_10").tap_names) == 3 * 5 + 1


@pytest.mark.parametrize(
    "name, kwargs, last_map",
    [
        ("preact_resnet18", {}, (512, 5, 5)),  # imagenet variant: 160 / 32
        ("vgg11_bn", {}, (512, 5, 5)),  # imagenet variant: five max-pools
        ("preact_resnet18", {"variant": "cifar", "width": 8}, (64, 20, 20)),  # the CIFAR net at 160 px
        ("resnet18", {"width": 8}, (64, 20, 20)),  # adaptive pool: the CIFAR net at 160 px
    ],
)
def test_160px(name, kwargs, last_map):
    torch.manual_seed(0)
    model = build(name, image_size=160, **kwargs).eval()
    with torch.no_grad():
        logits, taps = model(torch.rand(2, 3, 160, 160), taps=True)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert tuple(list(taps.values())[-2].shape[1:]) == last_map
    assert taps["penultimate"].shape == (2, last_map[0])


@pytest.mark.parametrize("name", ["preact_resnet18", "resnet18", "vgg11_bn", "wide_resnet"])
def test_grayscale_28px_100_classes(name):
    kwargs = {"depth": 10, "widen_factor": 1} if name == "wide_resnet" else {}
    model = build(name, num_classes=100, in_chans=1, image_size=28, **kwargs).eval()
    with torch.no_grad():
        logits, taps = model(torch.rand(3, 1, 28, 28), taps=True)
    assert logits.shape == (3, 100)
    assert getattr(model, "variant", "cifar") == "cifar"


def test_vgg_shapes_32px():
    model = build("vgg11_bn").eval()
    with torch.no_grad():
        _, taps = model(torch.rand(2, 3, 32, 32), taps=True)
    shapes = {k: tuple(v.shape[1:]) for k, v in taps.items()}
    # Su et al.'s CIFAR VGG: four max-pools, the last block unpooled (2x2), then average pooling
    assert shapes == {
        "block1": (64, 16, 16),
        "block2": (128, 8, 8),
        "block3": (256, 4, 4),
        "block4": (512, 2, 2),
        "block5": (512, 2, 2),
        "penultimate": (512,),
    }


def test_vgg_conv_taps_are_the_authors_resolution_of_the_same_network():
    """``taps="conv"``: the input of every convolution after the first and of the classifier (Su
    et al.'s 8 VGG11 taps), the same function and parameters as the block layout."""
    torch.manual_seed(0)
    blocks = build("vgg11_bn").eval()
    convs = build("vgg11_bn", taps="conv").eval()
    assert convs.tap_names == [f"conv{k}" for k in range(1, 8)] + ["penultimate"]
    assert n_params(convs) == n_params(blocks)
    convs.load_state_dict(dict(zip(convs.state_dict(), blocks.state_dict().values())))  # same order of tensors
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        (lb, tb), (lc, tc) = blocks(x, taps=True), convs(x, taps=True)
    torch.testing.assert_close(lc, lb)
    # a block's tap is the tap of its last conv unit
    for block, conv in (("block1", "conv1"), ("block2", "conv2"), ("block3", "conv4"), ("block4", "conv6")):
        torch.testing.assert_close(tc[conv], tb[block])
    assert tuple(tc["conv7"].shape[1:]) == (512, 2, 2)
    with pytest.raises(ValueError, match="vgg taps='layer'; allowed: block, conv"):
        build("vgg11_bn", taps="layer")


def test_cnn1d_is_the_mnist1d_papers_network_with_a_tap_at_every_block():
    """Greydanus & Kobak's ``ConvBase`` on length-40 sequences: Conv1d(1, 25, 5), Conv1d(25, 25, 3),
    Conv1d(25, 25, 3), stride 2 and padding 1, then Linear(125, 10): 150 + 1900 + 1900 + 1260 =
    5210 parameters without BatchNorm; taps after each block, the third flattened as penultimate."""
    torch.manual_seed(0)
    paper = build("cnn1d", in_chans=1, image_size=(1, 40), batch_norm=False).eval()
    assert n_params(paper) == 5210 and paper.tap_names == ["conv1", "conv2", "penultimate"]
    x = torch.rand(3, 1, 1, 40)
    with torch.no_grad():
        logits, taps = paper(x, taps=True)
    assert {k: tuple(v.shape) for k, v in taps.items()} == {"conv1": (3, 25, 19), "conv2": (3, 25, 10), "penultimate": (3, 125)}
    torch.testing.assert_close(paper.classifier(taps["penultimate"]), logits)
    with_bn = build("cnn1d", in_chans=1, image_size=(1, 40))
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.modules()) == 3 and with_bn.classifier.in_features == 125


def test_sequences_are_one_row_images_for_the_models_that_take_them():
    """``image_size=(1, 40)``: the MLP flattens 40 values; a model built for square images refuses
    them in one line naming the models that take sequences."""
    mlp = build("mlp", in_chans=1, image_size=(1, 40), depth=2, width=100)
    assert mlp.stages["layer1"][1].in_features == 40 and mlp(torch.rand(2, 1, 1, 40)).shape == (2, 10)
    assert build("deep_linear", in_chans=1, image_size=(1, 40)).stages["layer1"][1].in_features == 40
    with pytest.raises(ValueError, match="convnet takes square images, not 1x40 inputs; for sequences .* cnn1d, deep_linear, mlp"):
        build("convnet", in_chans=1, image_size=(1, 40))


def test_train_mode_taps_consistent():
    torch.manual_seed(0)
    model = build("preact_resnet18", width=8).train()
    x = torch.rand(4, 3, 32, 32)
    logits, taps = model(x, taps=True)
    torch.testing.assert_close(model.classifier(taps["penultimate"]), logits)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("vgg11_bn", {"image_size": 8}, "needs image_size >= 16"),
        ("vgg11_bn", {"image_size": 16, "variant": "imagenet"}, "needs image_size >= 32"),
        ("vgg11_bn", {"cfg": [[8]]}, "fixed configuration"),
        ("preact_resnet18", {"variant": "tiny"}, "variant must be one of auto, cifar, imagenet"),
        ("preact_resnet18", {"width": 0}, "positive"),
        ("resnet18", {"width": 0}, "resnet18 needs positive"),
        ("resnet18", {"variant": "cifar"}, "unknown option 'variant'; allowed: width, bias"),
        ("wide_resnet", {"depth": 30}, "6n \\+ 4"),
        ("wide_resnet", {"widen_factor": 0}, "widen_factor"),
        ("wide_resnet", {"dropout": 1.0}, "dropout"),
        ("wrn28_10", {"depth": 34}, "wrn28_10 fixes depth"),
        ("deep_linear", {"depth": 0}, "deep_linear option depth must be an integer >= 1"),
        ("deep_linear", {"width": 2.5}, "deep_linear option width must be an integer >= 1"),
        ("deep_linear", {"batch_norm": "off"}, "deep_linear option batch_norm must be true or false"),
        ("deep_linear", {"activation": "relu"}, "unknown option 'activation'; allowed: depth, width, batch_norm, bias"),
        ("mlp", {"bais": False}, "unknown option 'bais'; allowed: depth, width, bias"),
        ("cnn1d", {"channels": 0}, "cnn1d option channels must be an integer >= 1"),
        ("cnn1d", {"batch_norm": "yes"}, "cnn1d option batch_norm must be true or false"),
        ("cnn1d", {"image_size": 1}, "too short for its three stride-2 convolutions"),
    ],
)
def test_bad_options(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(name, **kwargs)


@pytest.mark.parametrize("name", list_models())
def test_normalized_features(name, forward_cache):
    """``normalized_features`` (every model, Yaras et al.): penultimate features and classifier rows
    on the unit sphere, no bias, logits = cos(w_c, h) / temperature; the family's own
    initialisation of the directions is kept; ``bias: true`` with it is refused."""
    torch.manual_seed(0)
    model = build(name, normalized_features={"temperature": 0.25}).eval()
    x = forward_cache(name)[1]
    with torch.no_grad():
        logits, taps = model(x, taps=True)
    h, W = taps["penultimate"], model.classifier.weight.detach()
    assert isinstance(model.classifier, nn.Linear) and model.classifier.bias is None
    torch.testing.assert_close(h.norm(dim=1), torch.ones(len(h)), rtol=0, atol=1e-5)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(10), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, h @ W.T / 0.25, rtol=1e-5, atol=1e-5)
    assert logits.abs().max() <= 4 + 1e-4  # |cos| / temperature
    torch.testing.assert_close(model.features(x), h)
    torch.manual_seed(0)
    plain = build(name, bias=False).classifier.weight.detach()  # seeded alike: the same directions
    torch.testing.assert_close(W, plain / plain.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="normalized_features has a bias-free classifier"):
        build(name, normalized_features={}, bias=True)


def test_normalized_features_state_round_trip_and_bad_options():
    """A checkpoint of a normalized model loads into a fresh one (the trained tensor is the raw
    weight; the unit rows follow); a bad temperature or key is one line naming the option."""
    import io

    a, b = build("mlp", normalized_features={"temperature": 0.1}), build("mlp", normalized_features={"temperature": 0.1})
    with torch.no_grad():
        a.classifier.parametrizations.weight.original.mul_(3.0).add_(1.0)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(b.classifier.weight, a.classifier.weight)
    for options, message in [
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number > 0"),
        ({"temp": 1.0}, "normalized_features must be a mapping"),
        (0.1, "normalized_features must be a mapping"),
    ]:
        with pytest.raises(ValueError, match=message):
            build("mlp", normalized_features=options)
