import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
OMNIGLOT_DIR = ROOT.parent / "shared" / "data" / "omniglot"


def have_fmnist() -> bool:
    env = os.environ.get("LOWSHOT_DATA")
    return (FMNIST / "train-images-idx3-ubyte.gz").is_file() or bool(
        env and (Path(env) / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file())


needs_fmnist = pytest.mark.skipif(not have_fmnist(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
needs_omniglot = pytest.mark.skipif(not (OMNIGLOT_DIR / "images_background_small1.zip").is_file(),
                                    reason="Omniglot small zips not found in ../shared/data/omniglot")


@pytest.fixture
def tiny_fmnist_overrides():
    """A few-second training run on a real Fashion-MNIST subset."""
    return ["data.options={max_per_class: 60}", "train.epochs=2", "train.batch_size=32", "train.progress=false",
            "val.episodes=20", "val.every=1", "val.method=ncm", "model.backbone=conv4"]


@pytest.fixture(scope="module")
def single_thread():
    """Tiny per-episode ops: a second OpenMP thread only adds contention on a shared 2-core CPU."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
