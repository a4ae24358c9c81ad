import sys

from poller.cli import main

sys.exit(main())
