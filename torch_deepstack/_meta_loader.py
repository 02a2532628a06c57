"""Import the fakes as `torch_deepstack.meta_impls`, installed or straight from a source checkout.

An install maps the repo's top-level meta_impls/ to torch_deepstack.meta_impls (setup.py). A source checkout
used through PYTHONPATH has no such mapping, so load the folder under its installed name.
"""
import importlib
import importlib.util
import sys
from pathlib import Path

NAME = "torch_deepstack.meta_impls"


def load_meta_impls():
    try:
        return importlib.import_module(NAME)
    except ModuleNotFoundError as e:
        if e.name != NAME:
            raise
    folder = Path(__file__).resolve().parent.parent / "meta_impls"
    spec = importlib.util.spec_from_file_location(NAME, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    if spec is None:
        raise ModuleNotFoundError(f"{NAME}: neither installed nor found at {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    spec.loader.exec_module(module)
    return module
