"""Classifier-free guidance on fastddpm's own UNet(num_classes=K): labels under y, the null class
(label K, row K of the label embedding)."""
import pytest
import torch

import fastddpm
from cond_models import tiny_cond_unet


KW = dict(steps=2, method="ddim", seed=0, backend="reference")


def test_unet_labels_go_under_y_and_its_null_class_is_label_k():
    m = tiny_cond_unet()
    y = torch.tensor([2, 0])
    got = fastddpm.sample(m, 2, class_labels=y, guidance_scale=2.0, **KW)
    torch.testing.assert_close(got, fastddpm.sample(m, 2, class_labels=y, guidance_scale=2.0, null_class=3, **KW),
                               rtol=0, atol=0)
    assert not torch.equal(got, fastddpm.sample(m, 2, class_labels=y, guidance_scale=2.0, null_class=1, **KW))
    assert not torch.equal(got, fastddpm.sample(m, 2, class_labels=y.flip(0), guidance_scale=2.0, **KW))
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 2\].*\[0, 3\]"):  # 3: the null class
        fastddpm.sample(m, 2, class_labels=torch.tensor([0, 3]), **KW)

