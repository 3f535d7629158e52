"""Test-wide settings: thread count and seeds; the shared ``corpus`` and ``finished_run`` fixtures.

Seeds are fixed by default, so a run is reproducible: every test starts from
torch/numpy/random seeded with ``base + crc32(test id)``, base 0. Fresh seeds
on request: ``pytest --seed random`` (or an integer base), or the environment
variable ``LONGNET_TEST_SEED`` (same values); the base is printed in the
header and each test prints its own seed, so a failure can be replayed with
``--seed <base>``. Hypothesis is derandomized unless a seed is requested.
"""

import os
import random
import zlib

import numpy as np
import pytest
import torch

# Small tensors: extra threads only add contention on CI's 2 cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ENV_SEED = "LONGNET_TEST_SEED"


def pytest_addoption(parser):
    parser.addoption("--seed", default=None,
                     help=f"base seed of the tests: an integer, or 'random' for a fresh one "
                          f"(default: fixed 0; also the environment variable {ENV_SEED})")


def _base_seed(raw):
    """(base, requested) from the --seed / LONGNET_TEST_SEED value."""
    if raw is None or raw == "":
        return 0, False
    if str(raw).lower() == "random":
        return int.from_bytes(os.urandom(4), "little"), True
    try:
        return int(raw), True
    except ValueError:
        raise pytest.UsageError(f"--seed / {ENV_SEED} must be an integer or 'random', got {raw!r}") from None


def pytest_configure(config):
    raw = config.getoption("--seed")
    base, requested = _base_seed(raw if raw is not None else os.environ.get(ENV_SEED))
    config.longnet_seed = base
    if not requested:
        from hypothesis import settings
        settings.register_profile("longnet-fixed", derandomize=True)
        settings.load_profile("longnet-fixed")


def pytest_report_header(config):
    return f"longnet test seed base: {config.longnet_seed} (--seed / {ENV_SEED}: an integer or 'random')"


def test_seed(config, nodeid: str) -> int:
    """The seed of one test: the base plus a hash of its id, so tests draw different numbers."""
    return (config.longnet_seed + zlib.crc32(nodeid.encode())) % 2**31


test_seed.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _seeded(request):
    s = test_seed(request.config, request.node.nodeid)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
    return s


@pytest.fixture
def seed(request, _seeded):
    """This test's seed (torch, numpy and random are already seeded with it), printed for replay."""
    print(f"seed={_seeded} (replay with --seed {request.config.longnet_seed})")
    return _seeded


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(data spec, cache dir) of a small text corpus, its cache built once before any subprocess."""
    from longnet.training.data import open_corpus
    from tests.train_helpers import write_corpus
    d = tmp_path_factory.mktemp("corpus")
    spec, cache = write_corpus(d), str(d / "cache")
    open_corpus(spec, cache_dir=cache, verbose=False)
    return spec, cache


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus):
    """A 4-step run with checkpoints at steps 2 and 4; tests work on copies (``train_helpers.copy_run``)."""
    from tests.train_helpers import run_train
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(corpus, out, "--max-steps", "4", "--set", "save_interval=2", "--set", "sample_tokens=0") == 0
    return out
