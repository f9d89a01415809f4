"""Classifier-free guidance on fastddpm's own UNet(num_classes=K): labels under y, the null class
(label K, row K of the label embedding), and the backends that take conditioning."""
import pytest
import torch

import fastddpm
from cond_models import tiny_cond_unet
from fastddpm import graphs


KW = dict(steps=2, method="ddim", seed=0, backend="reference")


def test_unet_labels_go_under_y_and_its_null_class_is_label_k():
    m = tiny_cond_unet()
    y = torch.tensor([2, 0])
    got = fastddpm.sample(m, 2, class_labels=y, guidance_scale=2.0, **KW)
    torch.testing.assert_close(got, fastddpm.sample(m, 2, class_labels=y, guidance_scale=2.0, null_class=3, **KW),
                               rtol=0, atol=0)
    assert not torch.equal(got, fastddpm.sample(m, 2, class_labels=y, guidance_scale=2.0, null_class=1, **KW))
    assert not torch.equal(got, fastddpm.sample(m, 2, class_labels=y.flip(0), guidance_scale=2.0, **KW))
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\].*\[0, 4\]"):
        fastddpm.sample(m, 2, class_labels=torch.tensor([0, 4]), **KW)


def test_unet_without_a_null_row_asks_for_null_class():
    m = tiny_cond_unet(null_row=False)
    with pytest.raises(ValueError, match="no null class of its own: pass null_class="):
        fastddpm.sample(m, 2, class_labels=1, guidance_scale=3.0, **KW)
    with pytest.raises(ValueError, match=r"null_class must be an int in \[0, 2\]"):
        fastddpm.sample(m, 2, class_labels=1, guidance_scale=3.0, null_class=3, **KW)
    assert fastddpm.sample(m, 2, class_labels=1, guidance_scale=3.0, null_class=0, **KW).shape == (2, 3, 8, 8)


def test_graph_refuses_conditioning_and_auto_runs_the_fused_loop(monkeypatch):
    """The captured loops call the model unconditionally: backend='graph' with labels is refused
    by name, and 'auto' (graph where CUDA graphs work) runs the fused loop instead."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)  # 'auto' resolves to graph here too
    graphs.clear_cache()
    m = tiny_cond_unet()
    kw = dict(steps=2, method="ddim", seed=0, class_labels=torch.tensor([1, 2]), guidance_scale=3.0)
    with pytest.raises(ValueError, match="backend='graph' does not take class_labels"):
        fastddpm.sample(m, 2, backend="graph", **kw)
    auto = fastddpm.sample(m, 2, backend="auto", **kw)
    torch.testing.assert_close(auto, fastddpm.sample(m, 2, backend="fused", **kw), rtol=0, atol=0)
    graphs.clear_cache()
