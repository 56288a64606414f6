import sys

from lmcd.cli import main

sys.exit(main())
