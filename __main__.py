"""``python -m kiln`` (and ``torchrun --nproc-per-node N -m kiln generate ...``): the kiln command."""
import sys

from .cli import main

sys.exit(main())
