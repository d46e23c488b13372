import sys

from pushchannel.bench import main

sys.exit(main(sys.argv[1:]))
