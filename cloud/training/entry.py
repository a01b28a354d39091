"""SageMaker script-mode entry point: ``entry_point="cloud/training/entry.py"``.

SageMaker runs this file as a script from ``source_dir`` (the repository
root) with the hyperparameters as flags and the ``SM_*`` variables set; it
puts the repository on the import path and runs ``python -m cloud.training``'s
``main`` unchanged. See docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from cloud.training.__main__ import main

    sys.exit(main())
