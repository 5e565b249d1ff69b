import sys

from eekernels.cli import main

sys.exit(main())
