"""`python -m lm2.pipeline.cli ...` is `lm2 ...` (torchrun and deepspeed start ranks this way)."""

import sys

from lm2.pipeline.cli import main

sys.exit(main())
