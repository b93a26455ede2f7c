"""`python -m npuserve.daemon.worker FD LEVEL DEVICE`: a model worker process."""

import sys

from npuserve.daemon.worker.process import main

main(sys.argv[1:])
