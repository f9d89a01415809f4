"""The Ho et al. U-Net: preset sizes, shapes, layouts, precision, compile-ability."""
import pytest
import torch

from fastddpm import UNet
from fastddpm.unet import PRESETS


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_preset_parameter_counts():
    # Ho et al. 2020: 35.7M (CIFAR-10) and 114M (256x256). The exact counts equal
    # diffusers' UNet2DModel built with the same architecture.
    assert n_params(UNet.from_preset("ddpm-cifar10")) == 35_746_307
    assert n_params(UNet.from_preset("ddpm-256")) == 113_673_219


@pytest.mark.parametrize("preset", ["tiny", "digits-16"])
def test_forward_shapes_and_timestep_dependence(preset):
    m = UNet.from_preset(preset).eval()
    c, r = m.config.in_channels, m.config.image_size
    x = torch.randn(3, c, r, r)
    t = torch.tensor([0, 500, 999])
    y = m(x, t)
    assert y.shape == x.shape and y.dtype == torch.float32
    y2 = m(x, torch.tensor([1, 500, 998]))
    assert not torch.allclose(y[0], y2[0]) and torch.allclose(y[1], y2[1], atol=1e-6)


def test_learned_range_output_channels_and_class_conditioning():
    m = UNet.from_preset("tiny", out_channels=6, num_classes=10).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    a = m(x, t, torch.tensor([1, 2]))
    b = m(x, t, torch.tensor([1, 7]))
    assert a.shape == (2, 6, 16, 16)
    assert torch.allclose(a[0], b[0], atol=1e-6) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="pass y"):
        m(x, t)


def test_channels_last_and_bf16_autocast():
    m = UNet.from_preset("tiny").eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        ref = m(x, t)
        cl = m.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
        torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = m(x, t)
    assert half.dtype == torch.bfloat16
    assert (half.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_fullgraph_trace_has_no_graph_breaks():
    """fullgraph=True raises on any graph break (host sync, data-dependent branch)."""
    m = UNet.from_preset("tiny").eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t), m(x, t), rtol=1e-5, atol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="image_size"):
        UNet.from_preset("tiny", image_size=17)
    with pytest.raises(ValueError, match="norm_groups"):
        UNet(ch=20, ch_mult=(1,), norm_groups=32)
    with pytest.raises(ValueError, match="preset"):
        UNet.from_preset("ddpm-cifar100")
    assert set(PRESETS) >= {"ddpm-cifar10", "ddpm-256"}


@pytest.mark.gpu
def test_cuda_graph_capture_and_compile():
    m = UNet.from_preset("tiny").cuda().eval()
    x, t = torch.randn(4, 3, 16, 16, device="cuda"), torch.randint(0, 1000, (4,), device="cuda")
    with torch.no_grad():
        ref = m(x, t)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                m(x, t)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = m(x, t)
        g.replay()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(m, fullgraph=True)
        torch.testing.assert_close(compiled(x, t), ref, rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert m.to(memory_format=torch.channels_last)(x, t).dtype == torch.bfloat16


def test_null_class_row_and_old_state_dicts():
    """num_classes=K: K + 1 label embeddings, label K (null_class) the unconditional one; a K-row
    state dict (written before the null class existed) loads with a zero null row and a warning."""
    m = UNet.from_preset("tiny", num_classes=4, ch=16, norm_groups=8).eval()
    assert m.num_classes == m.null_class == 4 and m.label_emb.weight.shape[0] == 5
    assert UNet.from_preset("tiny", ch=16, norm_groups=8).null_class is None
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 3])
    with torch.no_grad():
        a = m(x, t, torch.tensor([4, 0]))
        with pytest.raises(IndexError):
            m(x, t, torch.tensor([5, 0]))
    old = {k: v for k, v in m.state_dict().items()}
    old["label_emb.weight"] = old["label_emb.weight"][:4].clone()
    m2 = UNet.from_preset("tiny", num_classes=4, ch=16, norm_groups=8).eval()
    with pytest.warns(UserWarning, match="null class \\(label 4\\) is set to zeros"):
        m2.load_state_dict(old)
    assert torch.equal(m2.label_emb.weight[4], torch.zeros(64)) and torch.equal(m2.label_emb.weight[:4], old[
        "label_emb.weight"])
    with torch.no_grad():
        torch.testing.assert_close(m2(x, t, torch.tensor([1, 0]))[1], a[1], rtol=0, atol=0)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"num_classes must be a positive int .*got {bad!r}"):
            UNet.from_preset("tiny", num_classes=bad)


def test_one_label_for_the_batch_and_guidance_zero_is_the_null_class():
    """y may be an int or a 0-d tensor (the sampler's unconditional call passes the null class so);
    sample(guidance_scale=0) is then the null class's conditional sampling."""
    import fastddpm

    torch.manual_seed(0)
    m = UNet.from_preset("tiny", in_channels=1, num_classes=3, ch=16, norm_groups=8, attn_resolutions=()).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3, 9])
    with torch.no_grad():
        ref = m(x, t, torch.tensor([3, 3]))
        torch.testing.assert_close(m(x, t, 3), ref, rtol=0, atol=0)
        torch.testing.assert_close(m(x, t, torch.tensor(3)), ref, rtol=0, atol=0)
    kw = dict(steps=2, method="ddim", backend="reference", seed=1)
    a = fastddpm.sample(m, 2, class_labels=[0, 2], guidance_scale=0.0, **kw)
    b = fastddpm.sample(m, 2, class_labels=[3, 3], **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, fastddpm.sample(m, 2, class_labels=[0, 2], **kw))
