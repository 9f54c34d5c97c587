"""Tests of dinov2/utils/lazy.py and the lazy public names of dinov2.eval and dinov2.transfer."""

import importlib
import os
import subprocess
import sys

import pytest

from dinov2.utils.lazy import lazy_attributes


def test_lazy_attributes_import_on_first_access():
    getattr_, dir_ = lazy_attributes("pkg", {"sqrt": "math", "dumps": "json"})
    import math

    assert getattr_("sqrt") is math.sqrt
    assert dir_() == ["dumps", "sqrt"]
    with pytest.raises(AttributeError, match="module 'pkg' has no attribute 'nope'"):
        getattr_("nope")


@pytest.mark.parametrize("package", ["dinov2.eval", "dinov2.transfer"])
def test_every_public_name_resolves_to_its_module(package):
    pkg = importlib.import_module(package)
    assert sorted(dir(pkg)) == sorted(pkg.__all__) and pkg.__all__
    for name in pkg.__all__:
        module = importlib.import_module(pkg._LAZY[name])
        assert getattr(pkg, name) is getattr(module, name), name


def test_importing_the_packages_loads_no_submodule():
    code = (
        "import sys, dinov2.eval, dinov2.transfer; "
        "loaded = [m for m in sys.modules if m.startswith(('dinov2.eval.', 'dinov2.transfer.'))]; "
        "assert not loaded, loaded"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_by_module_inverts_the_grouping_and_rejects_a_name_listed_twice():
    from dinov2.utils.lazy import by_module

    assert by_module({"pkg.a": ("x", "y"), "pkg.b": ("z",)}) == {"x": "pkg.a", "y": "pkg.a", "z": "pkg.b"}
    with pytest.raises(ValueError, match="'x' is listed under both 'pkg.a' and 'pkg.b'"):
        by_module({"pkg.a": ("x",), "pkg.b": ("x",)})
    with pytest.raises(TypeError, match="sequence of names"):
        by_module({"pkg.a": "x"})  # a bare string would export 'x' letter by letter
