import os

import pytest
import torch

from lowshot.checkpoint import load_checkpoint, save_checkpoint
from lowshot.fileio import atomic_write
from lowshot.errors import CheckpointError


def test_roundtrip_plain_data(tmp_path):
    obj = {"model": {"w": torch.arange(3.0)}, "config": {"a": [1, 2.5, None, "x"]}, "epoch": 2}
    save_checkpoint(obj, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["config"] == obj["config"]
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp files left


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickled_callable_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Evil()}, path)  # plain torch.save pickles the callable
    with pytest.raises(CheckpointError, match="refused to load .*evil.pt"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_truncated_and_missing(tmp_path):
    save_checkpoint({"x": torch.ones(1000)}, tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t.pt"):
        load_checkpoint(tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint({"v": 1}, target)

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert load_checkpoint(target)["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_safetensors_export(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    from lowshot.checkpoint import export_safetensors
    ck = {"model": {"conv.weight": torch.randn(2, 3)}, "head": {"weight": torch.randn(4, 2)}, "class_names": list("abcd")}
    export_safetensors(ck, tmp_path / "w.safetensors")
    back = st.load_file(str(tmp_path / "w.safetensors"))
    assert torch.equal(back["model.conv.weight"], ck["model"]["conv.weight"])
    assert torch.equal(back["head.weight"], ck["head"]["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
