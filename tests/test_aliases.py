"""The short import paths of the modules that live in ringattn.app and ringattn.training."""

import importlib
import pickle
import subprocess
import sys

import pytest

import ringattn
from ringattn import _aliases


@pytest.mark.parametrize("short", sorted(_aliases.ALIASES))
def test_short_path_is_the_same_module(short):
    real = _aliases.ALIASES[short]
    assert importlib.import_module(short) is importlib.import_module(real)
    assert importlib.import_module(short).__spec__.name == real


def test_submodules_and_from_imports():
    scope = {}
    exec("from ringattn.model.loss import IGNORE_INDEX, shard_batch\n"
         "import ringattn.model.loss as short\n"
         "from ringattn.generate import SamplingConfig", scope)
    loss = importlib.import_module("ringattn.app.model.loss")
    assert scope["short"] is loss and scope["shard_batch"] is loss.shard_batch and scope["IGNORE_INDEX"] == -100
    assert ringattn.model.llama is importlib.import_module("ringattn.app.model.llama")
    assert scope["SamplingConfig"] is importlib.import_module("ringattn.app.generate").SamplingConfig
    assert _aliases.target("ringattn.modelx") is None and _aliases.target("ringattn.masks") is None


def test_one_module_under_both_names_pickles_by_its_real_path():
    real = importlib.import_module("ringattn.app.train")
    short = importlib.import_module("ringattn.train")

    assert pickle.loads(pickle.dumps(short.train)) is real.train
    assert short.train.__module__ == "ringattn.app.train"


def test_fresh_interpreter_imports_short_path_first():
    code = ("import ringattn.launch as a, ringattn.training.launch as b, sys; "
            "assert a is b; assert 'ringattn.launch' in sys.modules; "
            "import ringattn.checkpoint as c; assert c.__name__ == 'ringattn.training.checkpoint'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_errors_keep_their_documented_names():
    from ringattn.training.checkpoint import LoadInterrupted
    from ringattn.training.launch import RankError

    assert f"{RankError.__module__}.{RankError.__qualname__}" == "ringattn.launch.RankError"
    assert LoadInterrupted.__module__ == "ringattn.checkpoint"
    e = pickle.loads(pickle.dumps(RankError("rank 1 failed", usage=True)))
    assert type(e) is RankError and str(e) == "rank 1 failed"
