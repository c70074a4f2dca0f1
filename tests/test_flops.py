"""The FLOP counter: hand-computed small nets, and FCN-8s against docs/facts.md's cost table.

Models at width 1 are built on the meta device (no 538 MB of random weights), which
the counter supports directly.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfcn
from fastfcn.flops import count_macs


def meta_model(arch, **kw):
    with torch.device("meta"):
        return fastfcn.models.build(arch, **kw)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(8, 4, 4, stride=2)
        self.extra = nn.Parameter(torch.randn(4, 4, 2, 2))  # used only functionally
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.grouped(self.conv(x))
        h = self.up(h)
        h = F.conv_transpose2d(h, self.extra, stride=2)
        return self.fc(h.mean((2, 3)))


def small_expected(n, h, w):
    conv = n * 8 * h * w * 3 * 3 * 3
    grouped = n * 8 * h * w * (8 // 4) * 3 * 3
    up = n * 8 * h * w * 4 * 4 * 4  # every input element scatters into 4 outputs x 4x4 taps
    h2, w2 = (h - 1) * 2 + 4, (w - 1) * 2 + 4
    extra = n * 4 * h2 * w2 * 4 * 2 * 2
    fc = n * 4 * 5
    return {"conv": conv, "grouped": grouped, "up": up, "extra": extra, "fc": fc}


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_small_net_hand_count(device):
    m = Small()
    c = count_macs(m, (2, 3, 7, 13), device=device)
    exp = small_expected(2, 7, 13)
    got = {layer.name: layer.macs for layer in c.layers}
    assert got == exp
    assert c.macs == sum(exp.values()) and c.flops == 2 * c.macs
    assert c.method == ("meta" if device == "meta" else "real-batch1-scaled")


def test_restores_mode_and_counts_in_eval():
    m = Small().train()
    count_macs(m, (1, 3, 5, 5))
    assert m.training


def test_fcn8s_500_matches_the_cost_table():
    m = meta_model("fcn8s")
    c = count_macs(m, (1, 3, 500, 500))
    # docs/facts.md, "Cost of FCN-8s": 181.5 GMAC per image; conv1 18.8, conv2 26.9, conv3 45.2, conv4 45.7,
    # conv5 13.7, fc6 26.3, fc7 4.3 GMAC; dense upscore8 553 MMAC.
    assert c.gmac == pytest.approx(181.5, abs=0.1)
    groups = {k: v / 1e9 for k, v in c.by_group().items()}
    for k, v in {"conv1": 18.8, "conv2": 26.9, "conv3": 45.2, "conv4": 45.7, "conv5": 13.7,
                 "fc6": 26.3, "fc7": 4.3}.items():  # fmt: skip
        assert groups[k] == pytest.approx(v, abs=0.05), k
    up8 = [layer for layer in c.layers if layer.name.startswith("upscore8")]
    assert len(up8) == 1 and up8[0].macs / 1e6 == pytest.approx(553, abs=1)
    # The head's deconvs run through functional ops: they must be counted too.
    assert {"upscore2.weight", "upscore_pool4.weight"} <= {layer.name for layer in c.layers}


def test_scales_with_batch_and_size():
    m = meta_model("fcn32s", width=0.25)
    one = count_macs(m, (1, 3, 64, 96)).macs
    assert count_macs(m, (3, 3, 64, 96)).macs == 3 * one
    assert count_macs(m, (1, 3, 128, 96)).macs > one


def test_deconvnet_counts_transposed_convs():
    m = meta_model("deconvnet", width=0.25)
    c = count_macs(m, (1, 3, 224, 224))
    kinds = {layer.kind for layer in c.layers}
    assert {"Conv2d", "ConvTranspose2d"} <= kinds
    dec = sum(layer.macs for layer in c.layers if layer.name.startswith("deconv"))
    enc = sum(layer.macs for layer in c.layers if layer.name.startswith("conv"))
    # The decoder mirrors the encoder: deconv5..2 equal conv5..2, deconv1_x costs 64->64 twice
    # where conv1 has 3->64 then 64->64, so the decoder is a little larger.
    assert enc < dec < 1.5 * enc


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size"):
        count_macs(Small(), (1, 3, 0, 5))


@pytest.mark.parametrize(
    "size, skipped_gmac, fraction",
    [((500, 500), 55.96, 0.308), ((224, 224), 31.37, 0.499), ((1080, 1920), 145.67, 0.135)],
)
def test_computed_macs_skip_the_image_independent_positions(size, skipped_gmac, fraction):
    # docs/facts.md, "Image-independent positions": about 56 of 181.5 GMAC at 500x500 never
    # depend on the image (31%), about 50% at 224x224, about 14% at 1920x1080. Computed: a
    # little more than the dependent part, as the conv before a pool also computes the outputs
    # the pool's window reads (conv1_2: 506^2 instead of 504^2; 56.27 GMAC are independent,
    # 55.96 skipped).
    m = meta_model("fcn8s")
    c = count_macs(m, (1, 3, *size))
    assert (c.macs - c.computed_macs) / 1e9 == pytest.approx(skipped_gmac, abs=0.01)
    assert 1 - c.computed_macs / c.macs == pytest.approx(fraction, abs=0.001)
    assert c.computed_gmac == pytest.approx(c.computed_macs / 1e9)
    if size == (500, 500):
        layers = {layer.name: layer for layer in c.layers}
        # conv1_1 computes 502 x 502 of its 698 x 698 outputs, conv1_2 506 x 506; conv5_3 and
        # everything after all.
        assert layers["conv1_1"].computed_macs == layers["conv1_1"].macs // 698**2 * 502**2
        assert layers["conv1_2"].computed_macs == layers["conv1_2"].macs // 698**2 * 506**2
        assert layers["conv5_3"].computed == layers["conv5_3"].macs
        assert layers["fc6"].computed == layers["fc6"].macs
        assert "computed" in c.table().splitlines()[0]


def test_computed_macs_off_and_for_models_without_steps():
    m = meta_model("fcn8s", width=0.25)
    off = count_macs(m, (2, 3, 64, 64), skip_dead_zone=False)
    assert all(layer.computed_macs is None for layer in off.layers)
    assert off.computed_macs == off.macs
    torch.manual_seed(0)
    real = fastfcn.models.build("fcn8s", width=0.125)
    on = count_macs(real, (2, 3, 64, 64), device="cpu")  # the real-forward path fills it too
    assert on.method == "real-batch1-scaled"
    assert on.computed_macs < on.macs
    assert on.computed_macs == count_macs(meta_model("fcn8s", width=0.125), (2, 3, 64, 64)).computed_macs
    plain = count_macs(Small(), (1, 3, 7, 13))
    assert plain.computed_macs == plain.macs
