"""`ray job submit ... -- python -m jobs.prepare [flags of `gensr prepare`]`"""

import sys

from gensr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
