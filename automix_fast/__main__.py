import sys

from automix_fast.cli import main

sys.exit(main())
