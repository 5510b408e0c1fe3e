"""Backbones and neck: the original parameter names and shapes, and outputs equal to a functional re-implementation.

The expected names are written here from reading the originals (mmdet 2.x ResNet with
style='pytorch' or 'caffe'; the StreamPETR repository's vovnet.py and cp_fpn.py), not derived from
the modules under test. The functional paths read the weights by those names.
"""

import pytest
import torch
import torch.nn.functional as F

from original_tables import cpfpn, resnet50, vovnet99
from tggbc.models.necks import CPFPN
from tggbc.models.resnet import ResNet
from tggbc.models.vovnet import VoVNet


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def randomize(module, seed=0):
    """Random weights and plausible BatchNorm statistics, so every BN really normalises."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:  # BN weight
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / fan_in) ** 0.5)
    return module.eval()


def bn(sd, name, x):
    return F.batch_norm(
        x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5
    )


def resnet_reference(sd, x, style, out_indices=(2, 3)):
    """mmdet's ResNet-50 forward, step by step from the state dict."""
    x = F.relu(bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    outs = []
    for stage, blocks in enumerate((3, 4, 6, 3)):
        for j in range(blocks):
            p = f"layer{stage + 1}.{j}"
            stride = 2 if (j == 0 and stage > 0) else 1
            s1, s2 = (1, stride) if style == "pytorch" else (stride, 1)
            out = F.relu(bn(sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"], stride=s1)))
            out = F.relu(bn(sd, f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], stride=s2, padding=1)))
            out = bn(sd, f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv3.weight"]))
            if j == 0:
                x = bn(sd, f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = F.relu(out + x)
        if stage in out_indices:
            outs.append(x)
    return outs


def vovnet_reference(sd, x):
    """StreamPETR's VoVNet V-99-eSE forward (out_features stage4, stage5), step by step from the state dict."""

    def cbr(prefix, x, stride=1):
        w = sd[f"{prefix}/conv.weight"]
        return F.relu(bn(sd, f"{prefix}/norm", F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)))

    x = cbr("stem.stem_1", x, 2)
    x = cbr("stem.stem_2", x)
    x = cbr("stem.stem_3", x, 2)
    outs = []
    for s, blocks in enumerate((1, 3, 9, 3)):
        if s > 0:
            x = F.max_pool2d(x, 3, stride=2, ceil_mode=True)
        for b in range(blocks):
            name = f"OSA{s + 2}_{b + 1}"
            prefix = f"stage{s + 2}.{name}"
            feats, y = [x], x
            for layer in range(5):
                y = cbr(f"{prefix}.layers.{layer}.{name}_{layer}", y)
                feats.append(y)
            y = cbr(f"{prefix}.concat.{name}_concat", torch.cat(feats, 1))
            se = F.conv2d(y.mean((2, 3), keepdim=True), sd[f"{prefix}.ese.fc.weight"], sd[f"{prefix}.ese.fc.bias"])
            y = y * F.relu6(se + 3) / 6
            x = y + x if b > 0 else y
        if s >= 2:
            outs.append(x)
    return outs


def test_resnet50_has_the_mmdet_names_and_shapes():
    assert shapes(ResNet(50, out_indices=(2, 3))) == resnet50()


@pytest.mark.parametrize("style", ["pytorch", "caffe"])
def test_resnet50_equals_the_functional_reference(style):
    model = randomize(ResNet(50, out_indices=(2, 3), style=style), seed=1)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        outs = model(x)
        ref = resnet_reference(model.state_dict(), x, style)
    assert [tuple(o.shape) for o in outs] == [(2, 1024, 4, 6), (2, 2048, 2, 3)]
    for o, r in zip(outs, ref, strict=True):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    # The stride sits on a different conv: the two styles give different features for the same weights.
    other = ResNet(50, out_indices=(2, 3), style="caffe" if style == "pytorch" else "pytorch").eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(x)[0], outs[0], atol=1e-3)


def test_norm_eval_keeps_batchnorm_statistics_frozen():
    model = randomize(ResNet(50, out_indices=(3,)), seed=3)
    before = model.bn1.running_mean.clone()
    model.train()
    assert not model.bn1.training and model.conv1.training
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)
    frozen = ResNet(50, out_indices=(3,), frozen_stages=1)
    assert not any(p.requires_grad for p in frozen.layer1.parameters())
    assert all(p.requires_grad for p in frozen.layer2.parameters())
    vov = VoVNet().train()
    assert not any(m.training for m in vov.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_vovnet99_has_the_original_names_and_shapes():
    assert shapes(VoVNet("V-99-eSE", out_features=("stage4", "stage5"))) == vovnet99()


def test_vovnet99_equals_the_functional_reference():
    model = randomize(VoVNet("V-99-eSE"), seed=4)
    # 80 x 48 -> 20 x 12 at stride 4; the ceil-mode pools give 10 x 6, 5 x 3 (floor would give 4 x 2), 2 x 1.
    x = torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        outs = model(x)
        ref = vovnet_reference(model.state_dict(), x)
    assert [tuple(o.shape) for o in outs] == [(1, 768, 5, 3), (1, 1024, 2, 1)]
    for o, r in zip(outs, ref, strict=True):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)


def test_cpfpn_names_and_semantics():
    neck = randomize(CPFPN([12, 20], 8, num_outs=2))
    assert shapes(neck) == cpfpn([12, 20], 8)
    g = torch.Generator().manual_seed(6)
    fine, coarse = torch.randn(2, 12, 5, 7, generator=g), torch.randn(2, 20, 3, 4, generator=g)
    sd = neck.state_dict()
    with torch.no_grad():
        out = neck([fine, coarse])
        lat1 = F.conv2d(coarse, sd["lateral_convs.1.conv.weight"], sd["lateral_convs.1.conv.bias"])
        lat0 = F.conv2d(fine, sd["lateral_convs.0.conv.weight"], sd["lateral_convs.0.conv.bias"])
        # Nearest resize 3x4 -> 5x7 by hand: source index floor(i * in / out).
        rows, cols = [i * 3 // 5 for i in range(5)], [j * 4 // 7 for j in range(7)]
        up = lat1[:, :, rows][:, :, :, cols]
        level0 = F.conv2d(lat0 + up, sd["fpn_convs.0.conv.weight"], sd["fpn_convs.0.conv.bias"], padding=1)
    assert len(out) == 2
    torch.testing.assert_close(out[0], level0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], lat1)


def test_bad_backbone_and_neck_settings_are_named():
    with pytest.raises(ValueError, match="depth"):
        ResNet(34)
    with pytest.raises(ValueError, match="style"):
        ResNet(50, style="tf")
    with pytest.raises(ValueError, match="out_indices"):
        ResNet(50, out_indices=(4,))
    with pytest.raises(ValueError, match="V-98"):
        VoVNet("V-98-eSE")
    with pytest.raises(ValueError, match="out_features"):
        VoVNet(out_features=("stage6",))
    with pytest.raises(ValueError, match="num_outs"):
        CPFPN([4, 8], 4, num_outs=3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ResNet(50)(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="level 1"):
        CPFPN([4, 8], 4)([torch.zeros(1, 4, 4, 4), torch.zeros(1, 7, 2, 2)])
