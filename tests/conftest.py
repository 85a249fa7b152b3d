# Triton chooses interpreter mode when a kernel is decorated, i.e. when `kernels` is first imported, so this must
# run before any test module imports it (a module-level line in one test file is too late if another test file
# imported kernels first). On a GPU machine, run with TRITON_INTERPRET=0 to test the compiled kernels.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests pin one thread per process: `make test` runs two pytest workers on two cores, and oversubscribed OpenMP
# threads spin-wait each other into multi-x slowdowns. Numerics then do not depend on the machine's core count.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The reference data files beside the checkout (CI has them; a user's clone may not)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA
