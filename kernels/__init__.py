"""Attention kernels over the tiers (imported as ``kvtier.kernels``); each module keeps its torch reference.

This folder sits at the repository's top level, so with the repository root on ``sys.path`` (``python -m ...`` run
from it, as the README's commands are) ``import kernels`` would find it, shadowing the Hugging Face ``kernels``
package that transformers imports (from 5.25 on, a dependency). Imported under that name, it hands the import over to
that package when one is installed; without one it stays an empty module, which transformers reads as no kernels.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file has run
        _spec.loader.exec_module(_module)
