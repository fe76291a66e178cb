"""laion_clap's HTS-AT audio model (its own htsat.py), importable without laion_clap's package imports.

`import laion_clap` (and any `laion_clap.clap_module.*` submodule, since a package's __init__ runs first)
imports its training and image code, which needs torchvision, webdataset, h5py and more; torchvision
does not install beside the project's torch. The audio model needs none of it: htsat.py imports only
torch, torchlibrosa and two helpers from the package's utils.py (which itself imports torchvision).

So this package's __path__ is [this folder, laion_clap's clap_module folder]: the standard way of
extending a package's search path (as pkgutil.extend_path does). `fusion.encoders._laion_htsat.htsat`
and `.feature_fusion` are laion_clap's installed files, unchanged; their relative import of `.utils`
finds utils.py here first: the two operations it needs, written for this project, without torchvision.
Nothing is put into sys.modules by hand and no third-party name is faked. Only fusion.encoders.laion
imports this package, and only `.htsat` from it; without laion_clap installed the search path is this
folder alone, and importing `.htsat` raises ModuleNotFoundError. (A tool that walks every module of
this package would also find laion_clap's other files, which import torchvision: import none of them.)
"""

from __future__ import annotations

import importlib.util
import os

_spec = importlib.util.find_spec("laion_clap")  # locates the package without running its __init__
if _spec is not None and _spec.submodule_search_locations:
    CLAP_MODULE_DIR: str | None = os.path.join(list(_spec.submodule_search_locations)[0], "clap_module")
    __path__.append(CLAP_MODULE_DIR)  # noqa: F821 (a package's __path__ is set by the import system)
else:
    CLAP_MODULE_DIR = None
