"""memshard: diffusion models that do not copy their training data, on Ray, tracked in MLflow.

One import name for the whole project. The design keeps the capability folders at the repository's
top level (`orchestrator/`, `shard_worker/`, `aggregation/`, `evaluation/`, `unlearning/`,
`tuning/`); they are
the subpackages `memshard.orchestrator`, `memshard.shard_worker`, ... An installed wheel holds them
inside this package (pyproject's package-dir mapping). From a source tree — an editable install,
or `ray job submit --working-dir .`, where Ray puts the uploaded checkout on PYTHONPATH — they are
found next to this folder, so the uploaded code is the code that runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SUBPACKAGES = ("orchestrator", "shard_worker", "aggregation", "evaluation", "unlearning", "tuning")

_here = Path(__file__).resolve().parent
_source_root = _here.parent
if not (_here / "orchestrator").is_dir() and all((_source_root / name / "__init__.py").is_file() for name in SUBPACKAGES):
    __path__.append(str(_source_root))  # type: ignore[name-defined]  # a source tree: subpackages beside us


class _LegacyModelNames(importlib.abc.MetaPathFinder):
    """Models registered before the rename pickled `orchestrator.pipeline_model.DDPMPipelineModel`.

    After `import memshard`, that one module name (and its parent) resolve to memshard's own, so
    `mlflow.pyfunc.load_model` still loads them. Placed last on `sys.meta_path`: a real package named
    `orchestrator` elsewhere on the path always wins, so memshard claims no generic name.
    """

    ALIASES = {"orchestrator": "memshard.orchestrator",
               "orchestrator.pipeline_model": "memshard.orchestrator.pipeline_model"}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(self.ALIASES[fullname]))


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass  # already executed under its real name


if not any(isinstance(finder, _LegacyModelNames) for finder in sys.meta_path):
    sys.meta_path.append(_LegacyModelNames())
