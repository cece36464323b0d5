"""`ray job submit ... -- python -m jobs.eval [flags of `gensr eval`]`"""

import sys

from gensr_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
