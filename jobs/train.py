"""`ray job submit ... -- python -m jobs.train [flags of `gensr train`]`"""

import sys

from gensr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
