"""`ray job submit ... -- python -m jobs.tune [flags of `gensr tune`]`"""

import sys

from gensr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
