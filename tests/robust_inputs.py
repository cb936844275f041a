"""Builders of bad inputs for tests/test_robustness.py: truncated and junk files, a malicious pickle, unrelated /
reshaped MindSpore checkpoints (forged PNGs and the misbehaving image server are in tests/helpers.py).
"""
import os
import pickle


# --------------------------------------------------------------------------------------------------- files
def truncated_copy(src, dst, fraction=0.5):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * fraction)])
    return dst


def write(path, data):
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------------------------------- pickle
class _OpensSentinel:
    """Unpickling this object calls open(sentinel, "w"): the sentinel file appearing proves a pickle ran."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def evil_pickle(path, sentinel):
    """A pickle (protocol 2, as torch.save's legacy format) that creates `sentinel` when it is loaded."""
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _OpensSentinel(sentinel)}, f, protocol=2)
    assert not os.path.exists(sentinel)
    return path


# ----------------------------------------------------------------------------------------------- checkpoints
def unrelated_ckpt(path):
    """A valid MindSpore checkpoint of some other network (mindspore.save_checkpoint)."""
    import mindspore as ms
    import numpy as np
    ms.save_checkpoint([{"name": "backbone.conv1.weight", "data": ms.Tensor(np.ones((8, 3, 3, 3), np.float32))},
                        {"name": "head.fc.bias", "data": ms.Tensor(np.zeros((10,), np.float32))}], path)
    return path


def reshaped_ckpt(src, path, name="multi_modal_projector.linear_2.bias"):
    """`src` with one weight cut to another shape (saved by mindspore.save_checkpoint)."""
    import mindspore as ms
    params = ms.load_checkpoint(src)
    value = params[name].asnumpy()
    items = [{"name": k, "data": (ms.Tensor(value[:-1]) if k == name else v)} for k, v in params.items()]
    ms.save_checkpoint(items, path)
    return path
