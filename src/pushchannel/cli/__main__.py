import sys

from pushchannel.cli import main

sys.exit(main())
